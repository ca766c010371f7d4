"""Flag typos and values of the wrong type are one line that names what was meant (issue 17).

The command-line cases (exit status 2, nothing written) are in test_bad_input.py; these check the
messages themselves against the exceptions absl and ml-collections raise, without a subprocess.
"""
import os

from rlhf_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = f"--config={os.path.join(ROOT, 'configs', 'sft.py')}:tiny"
PPO = f"--config={os.path.join(ROOT, 'configs', 'ppo_ptx.py')}"


def _message(config, flag, error):
  return errors._config_error(["main", config, flag], error)  # pylint: disable=protected-access


def test_top_level_typo_suggests_the_nested_field_of_that_name():
  # config_flags raises AttributeError(KeyError("'lrr'")) for a top-level field it lacks
  assert _message(SFT, "--config.lrr=1", AttributeError(KeyError("'lrr'"))) == (
      "--config.lrr: no such field; did you mean --config.optimizer.lr?")


def test_nested_typo_uses_ml_collections_own_hint():
  error = AttributeError(KeyError('\'lrr\'\nDid you mean "lr" instead of "lrr"?'))
  assert _message(SFT, "--config.optimizer.lrr=1", error) == (
      "--config.optimizer.lrr: no such field; did you mean --config.optimizer.lr?")
  error = KeyError('\'optimzer\'\nDid you mean "optimizer" instead of "optimzer"?')
  assert _message(SFT, "--config.optimzer.lr=1", error) == (
      "--config.optimzer.lr: no such field; did you mean --config.optimizer.lr?")


def test_field_of_a_sub_config_lists_where_it_lives_own_stage_first():
  message = _message(PPO, "--config.batch_size=8", AttributeError(KeyError("'batch_size'")))
  assert message.startswith("--config.batch_size: no such field; did you mean "
                            "--config.ppo.batch_size, ")
  assert message.count("--config.") == 4 and message.endswith(".batch_size?")


def test_nothing_close_is_just_no_such_field():
  assert _message(SFT, "--config.model.zzzzzz=1", AttributeError(KeyError("'zzzzzz'"))) == (
      "--config.model.zzzzzz: no such field")


def test_wrong_type_says_what_was_expected():
  cases = {
      "flag --config.seed=1.5: invalid literal for int() with base 10: '1.5'":
          "--config.seed: expected an integer, got '1.5'",
      "flag --config.optimizer.lr=fast: could not convert string to float: 'fast'":
          "--config.optimizer.lr: expected a number, got 'fast'",
      "flag --config.pipeline=2: ('Non-boolean argument to boolean flag', '2')":
          "--config.pipeline: expected true or false, got '2'",
      "Unknown command line flag 'foo'": "Unknown command line flag 'foo'",
  }
  for raw, expected in cases.items():
    assert errors.flag_error(raw) == expected
