# One set-up command, one demo on the shipped CT, one test command (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# the CT ships with the module (Resources/SampleData), so a fresh clone runs the demo
SAMPLE ?= FewShotSegment/Resources/SampleData
OUT    ?= out/ct_demo

.PHONY: setup demo test benchmark

setup:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision are installed together first, pinned: the others import torchvision
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test]"

demo:
	$(PY) -m FewShotSegmentLib.cli make-template --overwrite \
	    --image $(SAMPLE)/example_ct.nii.gz \
	    --reference $(SAMPLE)/example_seg_fast_force_split.nii.gz \
	    --labels 5,1,2,3 --out $(OUT)/template.nrrd
	$(PY) -m FewShotSegmentLib.cli run --overwrite \
	    --image $(SAMPLE)/example_ct.nii.gz --template $(OUT)/template.nrrd \
	    --label 5=liver --label 1=spleen --label 2=kidney_right --label 3=kidney_left \
	    --out $(OUT) --cache-dir .cache/features

test:
	$(PY) -m pytest -q -W ignore::FutureWarning

benchmark:
	$(PY) benchmarks/accuracy.py --dataset all
	$(PY) benchmarks/speed.py --device cpu
