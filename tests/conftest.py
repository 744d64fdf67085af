import os

# No model hub, ever: every model in the tests is built from a config or a temp dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# `make test` runs two pytest-xdist workers: each picks `infscaled run` edge ports (LocalJob) from
# its own half of the default range, so two jobs starting at once never pick the same port.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.removeprefix("gw").isdigit():
    _first = 10_000 + 5_000 * (int(_WORKER.removeprefix("gw")) % 2)
    os.environ.setdefault("INFSCALED_RUN_PORTS", f"{_first}-{_first + 4_999}")
