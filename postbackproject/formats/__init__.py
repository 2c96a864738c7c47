"""Django format modules (FORMAT_MODULE_PATH): how pages write dates and times."""
