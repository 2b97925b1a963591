"""export.draft --kind=eagle: an EAGLE head distilled from the target's samples and features."""

import json

import numpy as np
import pytest

from export import draft as D


@pytest.fixture(scope="module")
def eagle_folder(trained_run, tmp_path_factory):
  root = tmp_path_factory.mktemp("eagle")
  cfg = D.DraftConfig(kind="eagle", prompts=32, prompt_len=32, new_tokens=48, steps=60,
                      batch_size=16)
  report = D.build_draft(trained_run, str(root / "eagle"), cfg, train_dir=str(root / "train"),
                         eval_prompts=2, eval_tokens=32)
  return root / "eagle", report


def test_the_distilled_head_is_exact_and_accepted(eagle_folder):
  folder, report = eagle_folder
  spec = report["m2_speculative"]
  assert spec["identical_to_plain_greedy"]
  assert spec["k"] == 4 and spec["tokens_per_round"] >= 2.5     # the goal
  assert json.loads((folder / "draft_report.json").read_text())["m2_speculative"] == spec
  # It learnt the target's tokens through the target's LM head: far below ln(259) nats.
  assert report["final"]["token_nll"] < 2.0

def test_the_folder_reads_back_bit_for_bit_and_drives_the_sampler(eagle_folder, trained_run,
                                                                   tmp_path):
  import jax

  from export import to_hf
  folder, report = eagle_folder
  cfg, params = D.read_eagle_folder(folder)
  target_cfg, target_params, _, _ = to_hf.read_checkpoint(to_hf.find_stage_dir(trained_run))
  assert cfg == target_cfg
  assert "embed" not in params and "lm_head" not in params  # it reads the target's
  D.write_eagle_folder(cfg, params, tmp_path)
  again_cfg, again = D.read_eagle_folder(tmp_path)
  assert again_cfg == cfg
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
                                   params, again))
  prompts = [[int(t) for t in np.arange(40, 72) % 200]]
  again = D.speculative_stats(target_cfg, target_params, *D.eagle_drafter(cfg, params), prompts,
                              new_tokens=16)
  assert again["identical_to_plain_greedy"]


def test_a_folder_without_the_head_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an EAGLE head folder"):
    D.read_eagle_folder(tmp_path)
