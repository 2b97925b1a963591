"""One tiny pipeline run (midtrain -> sft -> eval) shared by the eval tests."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(cache):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = ("midtrain", "sft", "eval")
  c.model.update(preset="", vocab_size=320, num_layers=1, embed_dim=32, num_heads=2,
                 num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.data.update(tokenizer="byte", cache_dir=cache, math_items=300)
  c.midtrain.domains.medical = ("mts_dialog",)
  c.midtrain.mix_batches = 2
  c.midtrain.train.update(steps=2, seq_len=32, log_every=1, save_every=2, eval_every=0)
  c.sft.sources = ("aci_bench",)
  c.sft.train.update(steps=2, seq_len=64, log_every=1, save_every=2, eval_every=0)
  # No RL stage here: "before" is midtrain, "after" the sft weights.
  c.eval.update(before="midtrain", healthbench_limit=3, consult_limit=2, max_turns=2,
                max_new_tokens=8, doctor_max_new_tokens=8, max_prompt_tokens=192)
  return c


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  from m2 import main
  # The session's data cache (shared with tests/sweep_test.py).
  cache = str(tmp_path_factory.getbasetemp() / "m2_data_cache")
  workdir = tmp_path_factory.mktemp("eval_run")
  config = tiny_config(cache)
  results = main.run(config, str(workdir))
  return workdir, config, results
