"""Reference sentence embeddings from all-MiniLM-L6-v2 with Hugging Face transformers
(BertModel, attention-masked mean pooling, L2 normalisation, as sentence-transformers does).

    python benches/minilm_reference.py <model-dir> > datasets/fixtures/minilm/reference.json
"""
import json
import sys

import torch
from transformers import AutoTokenizer, BertModel

SENTENCES = [
    "The user enjoys dark science-fiction thrillers from the 1990s.",
    "A light romantic comedy set in Paris.",
    "Toy Story (1995): Adventure|Animation|Children|Comedy|Fantasy",
]

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = BertModel.from_pretrained(path).eval()
batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
with torch.no_grad():
    out = model(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
emb = torch.nn.functional.normalize(emb, p=2, dim=1)
ids = [[int(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(batch["input_ids"], batch["attention_mask"])]
json.dump({"sentences": SENTENCES, "ids": ids, "embeddings": emb.tolist()}, sys.stdout)
