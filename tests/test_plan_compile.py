"""The compiler's answer: a stage's real step compiled for a TPU topology on this CPU machine (libtpu
from the test extra: jax[tpu]), the memory check before training, and the paper presets' refusal
to start from random initialisation."""
import os

import jax
import pytest

from rlhf_jax import config_files, plan, plan_compile, sharding
from rlhf_jax.errors import UserError
from rlhf_jax.train import sft, stage_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, preset="tiny", **fields):
  config = config_files.get_config(os.path.join(ROOT, "configs", f"{name}.py"), preset)
  for key, value in fields.items():
    node = config
    *parents, last = key.split(".")
    for part in parents:
      node = node[part]
    node[last] = value
  return config


def _tiny_sft():
  """One layer, 4 rows of 128 tokens: a few seconds of TPU compilation."""
  return _config("sft", **{"model.num_layers": 1, "batch_size": 4, "seq_len": 128})


@pytest.fixture
def no_compile_cache():
  """TPU executables stay out of the tests' persistent (CPU) compilation cache."""
  old = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", old)


def test_tiny_sft_step_compiles_for_v5e_2x2_and_is_checked_against_hbm(monkeypatch,
                                                                       no_compile_cache):
  """`plan --topology=v5e:2x2` for one stage: the TPU compiler's per-chip bytes of the step
  `sft.run` trains with; then `check_fits` on the same lowered step refuses it when the chip is
  made smaller than that, in one line naming the knobs."""
  pytest.importorskip("libtpu", reason="libtpu comes with the test extra (jax[tpu])")
  result = plan.plan_job(_tiny_sft(), {"topology": "v5e:2x2"}, "tiny")
  assert result["device_kind"] == "TPU v5 lite" and result["num_devices"] == 4
  row = result["stages"]["sft"]
  assert row["mesh"] == [1, 4, 1] and row["hbm_bytes"] == 16 * 2**30 and row["fits"] is True
  # The donated state (params + AdamW moments, float32, split over 4 chips) is an argument,
  # an output, and aliased; the rest is the compiler's temporaries.
  state = row["estimate_parts"]["params"] + row["estimate_parts"]["opt"]
  assert row["alias_bytes"] >= 0.9 * state
  # compiled_bytes is the compiler's peak; the sum of every temporary bounds it from above.
  assert row["sum_bytes"] == (row["argument_bytes"] + row["output_bytes"]
                              - row["alias_bytes"] + row["temp_bytes"])
  assert row["argument_bytes"] < row["compiled_bytes"] <= row["sum_bytes"]
  devices = plan_compile.topology_devices("v5e:2x2")
  mesh = sharding.make_mesh((1, 4, 1), devices)
  lowered = plan_compile.lowered_stage("sft", _tiny_sft(), mesh)
  needed, available = plan_compile.check_fits(lambda: lowered, "sft: memory", "KNOBS", devices)
  assert needed == row["compiled_bytes"] and available == 16 * 2**30
  monkeypatch.setitem(plan_compile.HBM_BYTES, "TPU v5 lite", needed - 1)
  with pytest.raises(UserError) as e:
    plan_compile.check_fits(lambda: lowered, "sft: memory", "KNOBS", devices)
  assert str(e.value).startswith("sft: memory: the compiled step needs ")
  assert "TPU v5 lite" in str(e.value) and str(e.value).endswith("turn down KNOBS")
  assert "\n" not in str(e.value)


def test_a_step_the_tpu_compiler_refuses_does_not_fit(no_compile_cache):
  """4096 rows of 1024 tokens on 4 v5e chips: the TPU compiler itself refuses the step at compile
  time (out of HBM, a second or two); plan reports fits false with the compiler's line, and the
  check before training refuses it in one line naming the knobs."""
  pytest.importorskip("libtpu", reason="libtpu comes with the test extra (jax[tpu])")
  config = _config("sft", **{"model.num_layers": 1, "batch_size": 4096, "seq_len": 1024})
  row = plan.plan_job(config, {"topology": "v5e:2x2"}, "tiny")["stages"]["sft"]
  assert row["fits"] is False and row["compiled_bytes"] is None
  assert row["compile_error"].startswith("Ran out of memory") and "HBM" in row["compile_error"]
  assert "| refused by the compiler: Ran out of memory" in plan.format_markdown(
      [{"job": "tiny", "topology": "v5e:2x2", "num_devices": 4, "stages": {"sft": row}}])
  devices = plan_compile.topology_devices("v5e:2x2")
  lowered = plan_compile.lowered_stage("sft", config, sharding.make_mesh((1, 4, 1), devices))
  with pytest.raises(UserError) as e:
    plan_compile.check_fits(lambda: lowered, "sft: memory", "KNOBS", devices)
  assert str(e.value).startswith("sft: memory: the compiler says the step does not fit a TPU v5")
  assert str(e.value).endswith("turn down KNOBS") and "\n" not in str(e.value)


def test_training_mesh_splits_physical_axes_on_v4():
  """`sharding.make_mesh` (what training builds its mesh with) on a v4:4x4x4 slice: tensor 2 is
  half of a physical axis, which jax.make_mesh refuses off v5e; every chip is used once."""
  pytest.importorskip("libtpu", reason="libtpu comes with the test extra (jax[tpu])")
  devices = plan_compile.topology_devices("v4:4x4x4")
  mesh = sharding.make_mesh((1, 32, 2), devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 32, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  with pytest.raises(NotImplementedError, match="allow_split_physical_axes"):
    jax.make_mesh((1, 32, 2), sharding.MESH_AXES, devices=devices)


def test_memory_check_is_a_no_op_on_cpu():
  """On CPU there is no device memory limit worth checking: nothing is lowered or compiled."""
  assert plan_compile.device_memory(jax.devices()[0]) is None
  assert plan_compile.check_fits(lambda: pytest.fail("lowered on CPU"), "sft", "knobs",
                                 jax.devices()) is None


@pytest.mark.slow
def test_training_refuses_a_step_that_cannot_fit(offline_data_dir, tmp_path, monkeypatch):
  """sft.run compiles its step before the loop writes anything and stops with one line naming
  the knobs when the devices are too small (here: CPU devices said to hold 1 MiB)."""
  monkeypatch.setattr(plan_compile, "device_memory", lambda device: 2**20)
  config = _config("sft", **{"init_from": "", "num_steps": 2, "data.prefetch": 0,
                             "data.dir": offline_data_dir})
  with pytest.raises(UserError, match=r"^sft: memory: the compiled step needs .* GiB per device"
                                      r".*config\.batch_size, config\.grad_accum_steps"):
    sft.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "sft")


@pytest.mark.parametrize("init_from", ["", "auto"])
def test_paper_presets_refuse_random_init_unless_asked(tmp_path, init_from):
  config = _config("sft", "6.7b", init_from=init_from, stage="pretrain")
  with pytest.raises(UserError, match=r"^config\.init_from: the 6\.7b preset would start "
                                      r"pretrain from random initialisation; .* or to 'random'"):
    stage_io.resolve_init(config, str(tmp_path), "pretrain", "")
  config.init_from = "random"
  assert stage_io.resolve_init(config, str(tmp_path), "pretrain", "") == ""
  tiny = _config("sft", init_from=init_from, stage="pretrain")
  assert stage_io.resolve_init(tiny, str(tmp_path), "pretrain", "") == ""
  assert not os.listdir(tmp_path)


def test_mesh_choice_follows_the_batches():
  """The config's mesh when its batches split over it, else fsdp as wide as every batch allows."""
  config = plan.paper_config("175b")
  assert plan_compile.choose_mesh("sft", config.sft, 1024) == (1, 8, 128)   # batch 8 (paper)
  assert plan_compile.choose_mesh("ppo", config, 1024) == (1, 64, 16)      # minibatch 64
  assert plan_compile.choose_mesh("sft", config.sft, 1024, "1,-1,64") == (1, 16, 64)
  assert sharding.resolve_mesh_shape(config.mesh.shape, 8) == (1, 8, 1)
