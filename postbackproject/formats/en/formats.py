"""One way to write a time and one to write a date-time, on every page, admin's included,
always in TIME_ZONE: 14:30:05 and 2026-12-04 14:30:05. Django's English formats mix 12-hour
clocks ("2:41 p.m."), month names and a time cut to minutes; an operator comparing the
dashboard, admin and the logs wants the same figures everywhere, sortable and unambiguous.
The dashboard's script writes its times the same way (static/dashboard/dashboard.js).

Only the formats that show values are set here: the input formats stay Django's, so forms
accept what they did."""

DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i:s"
DATETIME_FORMAT = "Y-m-d H:i:s"
SHORT_DATE_FORMAT = "Y-m-d"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
YEAR_MONTH_FORMAT = "Y-m"
MONTH_DAY_FORMAT = "m-d"
