"""`domainlm finetune`: instruction fine-tuning of a pretrained model folder, and the domain-vs-general comparison.

- ``data.py``     instruction JSONL → chat-templated token ids with a loss mask (labels -100 on the prompt)
- ``loop.py``     the fine-tuning loop around the pretraining step function (`domainlm.train.step.train_step`)
- ``compare.py``  fine-tune a domain and a general model the same way; score both on the downstream tasks
The downstream tasks themselves (LicenseDB category and name) live in `domainlm.evaluate.tasks`.
"""
