"""prepare: public files and the offline task end up as TFDS datasets; the CLI fails in one line."""
import os
import subprocess
import sys

import pytest

from rlhf_jax.data import builders
from rlhf_jax.data import offline_dataset
from rlhf_jax.data import prepare
from rlhf_jax.errors import UserError


def test_prepare_offline_builds_four_kinds(tmp_path):
  sizes = offline_dataset.OfflineSizes(ptx=20, sft=20, comparisons=10, prompts=10, validation=5)
  paths = prepare.prepare_offline(tmp_path, sizes=sizes)
  for kind in ("ptx", "sft", "comparisons", "prompts"):
    assert len(builders.load_source(paths["tfds"], kind, "validation")) == 5
  assert os.path.isfile(os.path.join(paths["tokenizer"], "tokenizer.json"))


def test_split_files_spec():
  assert prepare.parse_split_files("a.jsonl") == {"train": "a.jsonl"}
  assert prepare.parse_split_files("train=a,validation=b") == {"train": "a", "validation": "b"}
  with pytest.raises(UserError, match="--input must look like"):
    prepare.parse_split_files("train=a,train=b")


def test_cli_reports_bad_input_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.data.prepare", "--source=hh_rlhf",
       f"--input={tmp_path / 'missing.jsonl'}", f"--out_dir={tmp_path}"],
      capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 2
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith(f"error: {tmp_path / 'missing.jsonl'}: no such file")
