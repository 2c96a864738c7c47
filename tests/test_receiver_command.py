"""`manage.py receiver`: the local receiver of README's "Try it", run as a real process."""

import json
import re
import signal

import pytest
import requests

from postbackproject.settings import BASE_DIR
from tests.conftest import Processes, deliver_everything, free_port, http_answers, ingest_json, wait_until

README = (BASE_DIR / "README.md").read_text()
TRY_IT = README[README.index("## Try it") : README.index("## The contract")]


def start_receiver(processes: Processes) -> str:
    """`manage.py receiver` on a free port: its base URL, once it answers."""
    port = free_port()
    processes.run([str(BASE_DIR / "manage.py"), "receiver", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_answers(f"{url}/ready"), timeout=30, what="the receiver")
    return url


def test_ctrl_c_stops_it_quietly(processes):
    start_receiver(processes)
    [receiver] = processes.started

    receiver.send_signal(signal.SIGINT)

    assert receiver.wait(timeout=30) == 0
    assert printed_lines(processes)[-1] == "Stopped."
    assert "Traceback" not in processes.output()


def printed_lines(processes: Processes) -> list[str]:
    return processes.output().splitlines()


def test_it_answers_200_to_any_method_and_path_and_prints_each_request_on_one_line(processes):
    url = start_receiver(processes)

    answers = [
        requests.get(f"{url}/data?key=Azureus&value=Dendrobates&foo=", timeout=5),
        requests.post(f"{url}/hooks/a", data=b'{"note": "two\\nlines"}', timeout=5),
        requests.request("PURGE", f"{url}/", timeout=5),
        requests.delete(f"{url}/x?y=1", headers={"X-Postback-Id": "abc-0", "X-Postback-Attempt": "2"}, timeout=5),
    ]

    assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
    wait_until(lambda: any(" DELETE " in line for line in printed_lines(processes)), what="the last line")
    lines = printed_lines(processes)
    assert any(line.endswith("GET /data query='key=Azureus&value=Dendrobates&foo=' body=-") for line in lines)
    assert any(line.endswith('POST /hooks/a query=\'\' body="{\\"note\\": \\"two\\\\nlines\\"}"') for line in lines)
    assert any(line.endswith("PURGE / query='' body=-") for line in lines)
    assert any(line.endswith("DELETE /x query='y=1' X-Postback-Id=abc-0 X-Postback-Attempt=2 body=-") for line in lines)


@pytest.mark.django_db(transaction=True)
def test_the_readmes_try_it_delivers_the_sample_to_it(processes, client):
    command = next(line for line in TRY_IT.splitlines() if line.startswith("deploy/manage.sh receiver"))
    assert command.split("#")[0].split() == ["deploy/manage.sh", "receiver", "--port", "9000"]
    sample = re.search(r"--data-binary '([^']*127\.0\.0\.1:9000[^']*)'", TRY_IT)
    assert sample, "the README sends the sample to the receiver"
    url = start_receiver(processes)
    document = json.loads(sample.group(1).replace("http://127.0.0.1:9000", url))

    assert ingest_json(client, document).status_code == 202
    deliver_everything()

    wait_until(lambda: "Terribilis" in processes.output(), what="the second postback printed")
    lines = printed_lines(processes)
    assert any(" GET /data query='key=Azureus&value=Dendrobates&foo=' X-Postback-Id=" in line for line in lines)
    assert any(" GET /data query='key=Phyllobates&value=Terribilis&foo=' X-Postback-Id=" in line for line in lines)


def test_a_port_in_use_is_said_plainly(processes):
    url = start_receiver(processes)
    port = url.rsplit(":", 1)[1]

    second = processes.run([str(BASE_DIR / "manage.py"), "receiver", "--port", port])

    assert second.wait(timeout=60) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in processes.output()
    assert "Traceback" not in processes.output()
