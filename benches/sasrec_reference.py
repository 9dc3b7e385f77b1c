"""A RecBole-faithful SASRec in PyTorch, run on curec's prepared split: the cross-check for
`curec train sasrec` (not part of the build; needs torch, numpy, pyarrow and safetensors).

  python3 benches/sasrec_reference.py --data <prepared-dir> --check <run>/model.safetensors \
      --max_len 200 --act relu
      evaluates a curec SASRec checkpoint (default configuration) with this port's forward pass:
      validation and test NDCG@10 equal those in <run>/metrics.json (the forward passes agree);
  python3 benches/sasrec_reference.py --data <prepared-dir> --seed 2020,1,2 [--out results.jsonl]
      trains the port, one seed after another, and prints one JSON line per seed: test metrics at
      the selected epoch, and the per-epoch curve (loss, validation NDCG@10 and MRR@10, test
      NDCG@10; the test column is a diagnostic, never used for selection).

Defaults are RecBole 1.x's (SASRec.yaml + overall.yaml): 2 layers x 2 heads, d 64, inner 256,
dropout 0.5 on hidden states and attention, GELU, LayerNorm eps 1e-12, N(0, 0.02) init, softmax
cross-entropy over all items (and the padding class), Adam 1e-3, batch 2048, every prefix of the
train sequence (at most 50 items) as one sample, early stopping on validation MRR@10 after more than
10 epochs without a gain (ties move the best epoch forward). `--stride s --bs 205` trains curec's
windows instead (50 inputs ending every s targets, loss on the newest s, as dataflows/
sasrec-reference.toml). Evaluation: full ranking over all items, history masked (train at
validation, train + validation item at test), pessimistic ties. On this 2-core CPU an epoch of
sliding prefixes on ml-latest-small takes about 55 s; on a GPU, under a second.
"""
import argparse, json, math, time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F


def load(data):
    t = pq.read_table(f"{data}/interactions.parquet").to_pydict()
    n_items = pq.read_table(f"{data}/items.parquet").num_rows
    n_users = max(t["user"]) + 1
    train = [[] for _ in range(n_users)]
    valid = [0] * n_users
    test = [0] * n_users
    for u, i, s in zip(t["user"], t["item"], t["split"]):
        if s == "train":
            train[u].append(i + 1)
        elif s == "valid":
            valid[u] = i + 1
        else:
            test[u] = i + 1
    return n_users, n_items, train, valid, test


class MHA(nn.Module):
    def __init__(s, h, d, pa, ph, eps):
        super().__init__()
        s.h, s.dh = h, d // h
        s.q, s.k, s.v, s.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        s.ln = nn.LayerNorm(d, eps=eps)
        s.ad, s.od = nn.Dropout(pa), nn.Dropout(ph)

    def forward(s, x, mask):
        B, T, D = x.shape
        sp = lambda l: l(x).view(B, T, s.h, s.dh).transpose(1, 2)
        q, k, v = sp(s.q), sp(s.k), sp(s.v)
        sc = q @ k.transpose(-1, -2) / math.sqrt(s.dh) + mask
        p = s.ad(sc.softmax(-1))
        c = (p @ v).transpose(1, 2).reshape(B, T, D)
        return s.ln(s.od(s.o(c)) + x)


class FF(nn.Module):
    def __init__(s, d, inner, ph, act, eps):
        super().__init__()
        s.f1, s.f2 = nn.Linear(d, inner), nn.Linear(inner, d)
        s.ln = nn.LayerNorm(d, eps=eps)
        s.dr = nn.Dropout(ph)
        s.act = act

    def forward(s, x):
        h = s.f1(x)
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))) if s.act == "gelu" else F.relu(h)
        return s.ln(s.dr(s.f2(h)) + x)


class SASRec(nn.Module):
    def __init__(s, n_items, a):
        super().__init__()
        d = a.dim
        s.item = nn.Embedding(n_items + 1, d, padding_idx=0)
        s.pos = nn.Embedding(a.max_len, d)
        s.ln = nn.LayerNorm(d, eps=1e-12)
        s.dr = nn.Dropout(a.hd)
        s.att = nn.ModuleList([MHA(a.heads, d, a.ad, a.hd, 1e-12) for _ in range(a.blocks)])
        s.ff = nn.ModuleList([FF(d, a.inner, a.hd, a.act, 1e-12) for _ in range(a.blocks)])
        s.apply(s._init)

    def _init(s, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0.0, 0.02)
        elif isinstance(m, nn.LayerNorm):
            m.bias.data.zero_()
            m.weight.data.fill_(1.0)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()

    def forward(s, seq, lens):
        x = s.forward_all(seq)
        return x[torch.arange(seq.shape[0], device=seq.device), lens - 1]

    def forward_all(s, seq):
        B, T = seq.shape
        x = s.item(seq) + s.pos(torch.arange(T, device=seq.device)).unsqueeze(0)
        x = s.dr(s.ln(x))
        am = (seq > 0).float()[:, None, None, :]
        causal = torch.tril(torch.ones(T, T, device=seq.device))[None, None]
        mask = (1.0 - am * causal) * -10000.0
        for att, ff in zip(s.att, s.ff):
            x = ff(att(x, mask))
        return x


def pad(seqs, L):
    out = np.zeros((len(seqs), L), dtype=np.int64)
    lens = np.zeros(len(seqs), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-L:]
        out[r, : len(s)] = s
        lens[r] = len(s)
    return out, lens


def evaluate(model, inputs, targets, hist_mask, dev):
    model.eval()
    with torch.no_grad():
        seq, lens = inputs
        h = model(seq, lens)
        sc = h @ model.item.weight.T
        sc[:, 0] = -float("inf")
        sc[hist_mask] = -float("inf")
        t = sc.gather(1, targets[:, None])
        rank = (sc > t).sum(1) + (sc == t).sum(1) - 1
        r = rank.float()
        nd = torch.where(rank < 10, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r)).mean().item()
        mrr = torch.where(rank < 10, 1.0 / (r + 1.0), torch.zeros_like(r)).mean().item()
        rec = (rank < 10).float().mean().item()
    model.train()
    return {"ndcg10": nd, "mrr10": mrr, "recall10": rec}


def load_ours(model, path, blocks):
    from safetensors.torch import load_file

    w = load_file(path)
    sd = {"item.weight": w["item_emb"], "pos.weight": w["pos_emb"], "ln.weight": w["emb_ln.weight"], "ln.bias": w["emb_ln.bias"]}
    for b in range(blocks):
        for ours, theirs in [("q", "q"), ("k", "k"), ("v", "v"), ("o", "o")]:
            for p in ["weight", "bias"]:
                sd[f"att.{b}.{theirs}.{p}"] = w[f"blocks.{b}.{ours}.{p}"]
        for p in ["weight", "bias"]:
            sd[f"att.{b}.ln.{p}"] = w[f"blocks.{b}.ln1.{p}"]
            sd[f"ff.{b}.f1.{p}"] = w[f"blocks.{b}.ff1.{p}"]
            sd[f"ff.{b}.f2.{p}"] = w[f"blocks.{b}.ff2.{p}"]
            sd[f"ff.{b}.ln.{p}"] = w[f"blocks.{b}.ln2.{p}"]
    model.load_state_dict(sd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--seed", default="2020", help="one seed or several, comma-separated (run one after another)")
    ap.add_argument("--max_len", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--inner", type=int, default=256)
    ap.add_argument("--hd", type=float, default=0.5)
    ap.add_argument("--ad", type=float, default=0.5)
    ap.add_argument("--act", default="gelu")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=0, help="0: RecBole's sliding prefixes; s > 0: curec's windows "
                    "(max_len inputs ending every s targets, loss on the newest s; --bs counts windows)")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--stop", type=int, default=10)
    ap.add_argument("--metric", default="mrr10")
    ap.add_argument("--check", default=None, help="evaluate curec's SASRec checkpoint instead of training")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    d = prepare(a)
    if a.check:
        model = SASRec(d["n_items"], a).to(d["dev"])
        load_ours(model, a.check, a.blocks)
        print(json.dumps({"check": a.check, "valid": evaluate(model, *d["valid"]), "test": evaluate(model, *d["test"])}))
        return
    for seed in [int(x) for x in a.seed.split(",")]:
        a.seed = seed
        run(a, d)


def prepare(a):
    """The split, its evaluation inputs and the training samples, on the device (once for all seeds)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_users, n_items, train, valid, test = load(a.data)
    vin = pad(train, a.max_len)
    tin = pad([train[u] + [valid[u]] for u in range(n_users)], a.max_len)
    vmask = torch.zeros(n_users, n_items + 1, dtype=torch.bool)
    tmask = torch.zeros(n_users, n_items + 1, dtype=torch.bool)
    for u in range(n_users):
        vmask[u, train[u]] = True
        tmask[u, train[u]] = True
        tmask[u, valid[u]] = True
    T = lambda x: torch.as_tensor(x, device=dev)
    vin, tin = (T(vin[0]), T(vin[1])), (T(tin[0]), T(tin[1]))
    vmask, tmask = vmask.to(dev), tmask.to(dev)
    vt, tt = T(np.array(valid)), T(np.array(test))
    d = {"dev": dev, "n_items": n_items, "valid": (vin, vt, vmask, dev), "test": (tin, tt, tmask, dev)}
    if a.check:
        return d
    if a.stride > 0:
        # curec's training windows (rec/sasrec.rs, SasRecTower::windows): inputs seq[st:e]
        # predict seq[st+1:e+1]; the loss covers positions first..e-st.
        wins, tgts = [], []
        for u in range(n_users):
            s_, L = train[u], a.max_len
            end = len(s_) - 1
            while end > 0:
                st = max(0, end - L)
                first = 0 if st == 0 else (end - st) - min(a.stride, end - st)
                wins.append(s_[st:end])
                tgt = [-100] * L
                for j in range(first, end - st):
                    tgt[j] = s_[st + 1 + j]
                tgts.append(tgt)
                if st == 0:
                    break
                end -= min(a.stride, end - st)
        d["X"], d["Y"], d["XL"] = T(pad(wins, a.max_len)[0]), T(np.array(tgts)), None
    else:
        # RecBole's data augmentation: every prefix of the train sequence (last max_len items) -> next item.
        seqs, tg = [], []
        for u in range(n_users):
            s_ = train[u]
            for i in range(1, len(s_)):
                seqs.append(s_[max(0, i - a.max_len) : i])
                tg.append(s_[i])
        X, XL = pad(seqs, a.max_len)
        d["X"], d["Y"], d["XL"] = T(X), T(np.array(tg)), T(XL)
    return d


def run(a, d):
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    model = SASRec(d["n_items"], a).to(d["dev"])
    X, Y, XL = d["X"], d["Y"], d["XL"]
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    n = len(Y)
    best, best_ep, cur, hist = -1.0, -1, 0, []
    t0 = time.time()
    for ep in range(a.epochs):
        perm = torch.randperm(n, device=d["dev"])
        tot, cnt = 0.0, 0
        for b in range(0, n, a.bs):
            idx = perm[b : b + a.bs]
            if a.stride > 0:
                h = model.forward_all(X[idx])
                y = Y[idx].reshape(-1)
                loss = F.cross_entropy((h @ model.item.weight.T).reshape(y.shape[0], -1), y, ignore_index=-100)
                k = int((y >= 0).sum())
            else:
                h = model(X[idx], XL[idx])
                loss = F.cross_entropy(h @ model.item.weight.T, Y[idx])
                k = len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * k
            cnt += k
        v = evaluate(model, *d["valid"])
        te = evaluate(model, *d["test"])
        hist.append({"epoch": ep, "loss": tot / cnt, "valid": v, "test": te})
        if v[a.metric] >= best:
            best, best_ep, cur = v[a.metric], ep, 0
        else:
            cur += 1
            if cur > a.stop:
                break
    sel = hist[best_ep]
    nd_ep = max(range(len(hist)), key=lambda e: (hist[e]["valid"]["ndcg10"], e))
    peak = max(range(len(hist)), key=lambda e: hist[e]["test"]["ndcg10"])
    res = {
        "tag": a.tag, "data": a.data, "seed": a.seed, "bs": a.bs, "act": a.act, "hd": a.hd, "ad": a.ad, "lr": a.lr,
        "max_len": a.max_len, "stride": a.stride, "metric": a.metric, "stop": a.stop,
        "epochs": len(hist), "best_epoch": best_ep, "seconds": round(time.time() - t0, 1),
        "test_at_best": sel["test"], "valid_at_best": sel["valid"],
        "ndcg_sel_epoch": nd_ep, "test_at_ndcg_sel": hist[nd_ep]["test"],
        "test_peak_epoch": peak, "test_peak": hist[peak]["test"]["ndcg10"],
        "curve": [(h["epoch"], round(h["loss"], 4), round(h["valid"]["ndcg10"], 4), round(h["valid"]["mrr10"], 4), round(h["test"]["ndcg10"], 4)) for h in hist],
    }
    line = json.dumps(res)
    print(line)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
