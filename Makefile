# Spine Response Node — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench sysdeps venv clean

# Debian tools the tests use (dcmtk's storescu/storescp/echoscu, dicom3tools' dciodvfy, Orthanc).
SYSTOOLS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc chromium:chromium chromedriver:chromium-driver

sysdeps:
	@missing=""; for pair in $(SYSTOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spine-node demo

# 2 xdist workers; a file runs whole on one worker, the longest files first (tests/conftest.py)
test: sysdeps $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30

# ruff (the rule set in pyproject.toml) and the formatter check on the whole tree; mypy --strict
# on the science and the DICOM encoders (processing/, reporting/)
lint: $(STAMP)
	$(VENV)/bin/ruff check node processing reporting tests
	$(VENV)/bin/ruff format --check node processing reporting tests
	$(VENV)/bin/mypy --strict processing reporting

bench: sysdeps $(STAMP)
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
