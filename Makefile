# Set-up and run commands. Both create .venv when it is missing and install what they need.
# The torch/torchvision pins are the builds this machine kind has on disk; pyproject.toml keeps loose ranges.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test lint docs benchmarks clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed-torch: $(VENV)/bin/python
	$(PIP) install $(TORCH_PINS)
	touch $@

$(VENV)/.installed-examples: $(VENV)/.installed-torch pyproject.toml
	$(PIP) install $(TORCH_PINS) -e ".[examples]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-torch pyproject.toml
	$(PIP) install $(TORCH_PINS) -e ".[test,docs]"
	touch $@

## make demo: train the same CNN with BatchNorm and with MSR on scikit-learn digits; print and plot the comparison
demo: $(VENV)/.installed-examples
	$(PY) examples/demo.py --out demo_results

## make test: lint, docs build and the whole test suite (doctests included)
test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
	$(PY) -m pytest $(PYTEST_ARGS)

## make benchmarks: the Fashion-MNIST accuracy sweep (VGG + ResNet-20; many hours on a shared 2-core CPU, resumable). The data comes from
## Debian's package: `apt-get install -y dataset-fashion-mnist`; without it pass BENCH_ARGS=--download (torchvision).
BENCH_ARGS ?=
benchmarks: $(VENV)/.installed-examples
	$(PY) benchmarks/accuracy.py --dataset fashion_mnist --arch vgg resnet20 --batch-sizes 128 8 --epochs 2 \
		--train-size 5000 --test-size 5000 --lrs 0.025 0.05 0.1 0.2 --seeds 0 1 \
		--methods batchnorm "batchnorm[clip=1.0]" groupnorm frn msr_replace_noise $(BENCH_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf site demo_results build *.egg-info
