"""Is the fine-tune better? Benchmarks through lm-evaluation-harness (adapter on vs off, written under the run's
eval/ folder), and a blind arena whose votes become the QLoRA paper's Elo ratings (mean over random orderings,
with a 95% interval), rated by people on the page or by a judge model over an OpenAI-compatible endpoint.

No gradio here: the Evaluate tab (ui/tabs/benchmarks.py, ui/tabs/arena.py) and the CLI (`eval`, `arena`) call in."""
