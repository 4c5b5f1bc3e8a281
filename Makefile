# samresnets: `make test` (unit tests + notebooks in the smoke profile), `make report`.
#
#   make report [PROFILE=smoke|quick|cpu|paper] [DATA_DIR=data] [DEVICE=auto|cpu|cuda]
#               [SEEDS=84,85] [FINAL_SEEDS=84,85] [SWITCHES=schedule,cutout]
#               [KAGGLE_FILE=path/cifar_test_nolabel.pkl]
#       runs notebooks/*.ipynb in order with papermill into local/results/<profile>/ (runs, i.e.
#       checkpoints, go to runs/<profile>/; an interrupted report resumes), then `make html`.
#       Both folders are git-ignored: your work never touches the committed reports.
#   make publish PROFILE=...  regenerate the committed report results/<profile>/ (the one command
#                             that writes there; its runs: results/runs/<profile>/ when committed, else runs/)
#   make html [PROFILE=...]   static pages of the executed notebooks: local/results/<profile>/html/
#   make test                 pytest, then nbval over the stored notebooks in the smoke profile
#   make notebook-outputs     after editing notebooks: run them (smoke) and keep only the outputs
#                             of the # NBVAL_CHECK_OUTPUT cells, which nbval compares
#   make strip                clear notebook outputs except the # NBVAL_CHECK_OUTPUT cells
#   make git-filter           once per clone: git sees notebooks as stripped (outputs never reach a commit)
#   make gpu-check [DATA_DIR=data]   benchmarks/gpu_check.sh: benchmark + a short `final` run + evaluate on
#                             one GPU, within 8 minutes on an H100, into results/gpu/<device>/
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that this project's CI machine holds on local disk; any torch >= 2.4 works.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

PROFILE ?=
DATA_DIR ?= data
DEVICE ?= auto
SEEDS ?=
FINAL_SEEDS ?=
SWITCHES ?=
KAGGLE_FILE ?=
RESULTS ?= local/results
PUBLISHED := results
RUNS ?= runs
NOTEBOOKS := 00_data_exploration 01_table1_ablation 02_figure1_inference 03_submission
NBVAL_DIR := build/nbval
# git's clean filter for notebooks (make git-filter); absolute paths, whatever directory git runs it in
GIT_FILTER_CLEAN := "$(abspath $(PY))" "$(CURDIR)/tools/nbfilter.py" clean %f
# torch's OpenMP threads busy-wait: with another process on these 2 cores a CPU epoch ran 10-15x
# slower (32 s vs 4.6 s for a smoke epoch).  PASSIVE waiting avoids that (OMP_WAIT_POLICY=ACTIVE make ... opts out).
export OMP_WAIT_POLICY ?= PASSIVE

# PROFILE if given; else paper when torch sees CUDA (and DEVICE is not cpu), else quick.
define pick_profile
profile='$(PROFILE)'; \
if [ -z "$$profile" ]; then \
  cuda=$$($(PY) -c "import torch; print(torch.cuda.is_available())"); \
  if [ "$$cuda" = True ] && [ "$(DEVICE)" != cpu ]; then profile=paper; else profile=quick; fi; \
  echo "PROFILE not given: torch.cuda.is_available() is $$cuda (DEVICE=$(DEVICE)), so PROFILE=$$profile"; \
fi
endef

.PHONY: venv test unit nbval notebook-outputs report publish report-notebooks html strip clean-venv
.PHONY: gpu-check

# A clone whose filter still names the module it once lived in (samlib.report.notebooks) gets the new command.
venv: $(VENV)/.installed
	@if git config --get filter.samlib-strip.clean 2>/dev/null | grep -q 'samlib\.report\.notebooks'; then \
	  git config filter.samlib-strip.clean '$(GIT_FILTER_CLEAN)' && echo "git filter: now tools/nbfilter.py (as make git-filter)"; fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || \
	  $(PY) -m pip install -q $(TORCH_PINS) 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import samlib, torch, torchvision, pytest, hypothesis, papermill, nbval, nbconvert, ipykernel"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null   # papermill/nbval find "python3" here
	touch $@

unit: venv
	$(PY) -m pytest -q

test: unit nbval

# The smoke runs of the stored notebooks (make nbval, make notebook-outputs): their parameters
# read SAMLIB_* variables.  Data: the real CIFAR-10 copy when there is one (built once from
# $$SAMLIB_SHARED_DATA/make_cifar10.py when that exists), else synthetic data; plus a small
# Kaggle-format file so that the submission path runs too.  Outputs and runs go to build/nbval/,
# cleared each time (the run cache does not key on the data source).
define smoke_env
if [ -f $(DATA_DIR)/cifar-10-batches-py/test_batch ] && [ -f $(DATA_DIR)/cifar-10-batches-py/batches.meta ]; then \
  data=$(DATA_DIR); \
elif [ -n "$$SAMLIB_SHARED_DATA" ] && [ -f "$$SAMLIB_SHARED_DATA/make_cifar10.py" ]; then \
  echo "building the CIFAR-10 JPEG copy into $(DATA_DIR)/ (once)"; \
  $(PY) "$$SAMLIB_SHARED_DATA/make_cifar10.py" $(DATA_DIR) && data=$(DATA_DIR) || exit 1; \
else \
  data=$(NBVAL_DIR)/synthetic; \
  [ -f $$data/cifar-10-batches-py/batches.meta ] || $(PY) -m samlib synthetic $$data >/dev/null || exit 1; \
fi; \
rm -rf $(NBVAL_DIR)/runs $(NBVAL_DIR)/results; \
$(PY) tools/nbfilter.py kaggle-sample $$data $(NBVAL_DIR)/kaggle_sample.pkl --n 200 >/dev/null || exit 1; \
echo "smoke profile, data $$data"; \
export SAMLIB_PROFILE=smoke SAMLIB_DATA_DIR="$$(realpath $$data)" SAMLIB_RESULTS_DIR="$(CURDIR)/$(NBVAL_DIR)/results" \
  SAMLIB_RUNS_DIR="$(CURDIR)/$(NBVAL_DIR)/runs" SAMLIB_KAGGLE_FILE="$(CURDIR)/$(NBVAL_DIR)/kaggle_sample.pkl"
endef

# nbval runs the notebooks as stored in notebooks/; only the "# NBVAL_CHECK_OUTPUT" cells'
# outputs are compared (--nbval-lax), every cell must run without error.
nbval: venv
	@$(smoke_env); start=$$SECONDS; \
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with nbval_sanitize.cfg notebooks/ || exit 1; \
	echo "nbval took $$((SECONDS - start)) s"

# After editing a notebook: run it in the smoke profile and keep only the checked outputs.
notebook-outputs: venv
	@$(smoke_env); for nb in notebooks/[0-9]*.ipynb; do \
	  $(PY) -m nbconvert --to notebook --execute --inplace --log-level WARN $$nb || exit 1; done
	$(PY) tools/nbfilter.py strip notebooks/[0-9]*.ipynb

report: venv
	@$(pick_profile); \
	start=$$SECONDS; \
	$(MAKE) --no-print-directory report-notebooks PROFILE=$$profile || exit $$?; \
	$(MAKE) --no-print-directory html PROFILE=$$profile || exit $$?; \
	echo "report ($$profile) took $$((SECONDS - start)) s: $(RESULTS)/$$profile/html/index.html"

# The committed report of a profile, regenerated: the same notebooks, written into results/.
publish: venv
	@test -n "$(PROFILE)" || { echo "make publish needs PROFILE (e.g. make publish PROFILE=cpu)"; exit 2; }
	@runs=$(RUNS); [ -d $(PUBLISHED)/runs/$(PROFILE) ] && runs=$(PUBLISHED)/runs; \
	echo "publishing the $(PROFILE) report into $(PUBLISHED)/$(PROFILE)/ (runs from $$runs/$(PROFILE)/)"; \
	$(MAKE) --no-print-directory report PROFILE=$(PROFILE) RESULTS=$(PUBLISHED) RUNS=$$runs

report-notebooks: venv
	@test -n "$(PROFILE)" || { echo "report-notebooks needs PROFILE (or use make report)"; exit 2; }
	@$(PY) tools/report.py --profile $(PROFILE) --data-dir $(DATA_DIR) --device $(DEVICE) \
	  --results $(RESULTS) --runs $(RUNS) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(FINAL_SEEDS),--final-seeds $(FINAL_SEEDS)) $(if $(SWITCHES),--switches $(SWITCHES)) \
	  $(if $(KAGGLE_FILE),--kaggle-file $(KAGGLE_FILE))

html: venv
	@$(pick_profile); \
	ls $(RESULTS)/$$profile/[0-9]*.ipynb >/dev/null 2>&1 || { echo "no executed notebooks in $(RESULTS)/$$profile: run make report PROFILE=$$profile"; exit 2; }; \
	$(PY) -m nbconvert --to html --template samlib --TemplateExporter.extra_template_basedirs=$$($(PY) -c 'import samlib.report, pathlib; print(pathlib.Path(samlib.report.__file__).parent / "templates" / "nbconvert")') --log-level WARN --output-dir $(RESULTS)/$$profile/html $(RESULTS)/$$profile/[0-9]*.ipynb && \
	$(PY) tools/nbfilter.py index $(RESULTS)/$$profile

strip: venv
	$(PY) tools/nbfilter.py strip notebooks/[0-9]*.ipynb

# The git clean filter that .gitattributes names for notebooks/*.ipynb: git diff, add and commit see
# a notebook run in JupyterLab as `make strip` leaves it (the working copy keeps its outputs).  git
# status may list a rerun notebook until `git add` (a new file size counts as a change before any
# filter runs); that add stages nothing.  No smudge (checkout is a plain copy), and not `required`:
# with the venv gone git falls back to the unfiltered file instead of refusing to run.
.PHONY: git-filter
git-filter: venv
	git config filter.samlib-strip.clean '$(GIT_FILTER_CLEAN)'
	@echo "notebook outputs are now invisible to git; undo: git config --remove-section filter.samlib-strip"

clean-venv:
	rm -rf $(VENV)

# One GPU, end to end (see benchmarks/README.md).  Runs with PYTHON (default python3), not the venv:
# a GPU machine needs only torch & co.  Data: DATA_DIR, else built there from SAMLIB_SHARED_DATA.
gpu-check:
	DATA_DIR="$(DATA_DIR)" bash benchmarks/gpu_check.sh
