"""SimMatch parity against the authors' ImageNet code (KyleZheng1997/simmatch,
models/simmatch.py): EMA teacher with its own batch-norm statistics (no --eman, as
script/train.sh), DA queue of 256 batch means, bank overwritten with the teacher's
labeled embeddings, lambda_u 10, lambda_in 5, tau 0.7, c_smooth 0.9, tt = st = 0.1.

Set-up: the PyTorch venv of common_semi.py; the official tree at $SIMMATCH_SRC (default
/work/official/simmatch; commit 93a7b2449993a32fa627e2cbdb4651dfbf83a773). Run (main
Python):

    python benchmarks/parity/simmatch_official.py --case filled   # same DA queue both sides
    python benchmarks/parity/simmatch_official.py --case fresh    # each side's own init

The official SimMatch module is imported and called on one CPU process (a one-process
gloo group for its all_gather / all_reduce; its batch-shuffle BN is then a permutation of
one batch, which batch statistics do not see). Its backbone is a small net both sides
build identically (flatten -> Dense -> BatchNorm1d -> ReLU), so the teacher's and the
student's BN statistics are compared too. The losses follow the training loop of the
official simmatch.py:343-351 (CE, masked soft CE, mean of L_in), written out here because
that loop cannot be imported; the optimizer is torch SGD (nesterov, lr 0.03, momentum 0.9,
weight decay --wd) and then ``momentum_update_ema``, as simmatch.py:370-378.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import common_semi as cs  # noqa: E402

SRC = os.environ.get("SIMMATCH_SRC", "/work/official/simmatch")
C, B, NU, K, FEAT, DIM, IMG = 10, 8, 16, 12, 16, 32, 8
TAU, LAMBDA_U, LAMBDA_IN, T, ALPHA, DA_LEN, LR = 0.7, 10.0, 5.0, 0.1, 0.9, 256, 0.03


def inputs():
    rng = np.random.default_rng(3)
    x = {n: rng.normal(size=(m, IMG, IMG, 3)).astype(np.float32)
         for n, m in (("x", B), ("u_w", NU), ("u_s", NU))}
    idx = rng.choice(K, B, replace=False).astype(np.int64)
    labels = rng.integers(0, C, K).astype(np.int64)
    bank = rng.normal(size=(DIM, K)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=0, keepdims=True)
    queue = rng.dirichlet(np.ones(C), DA_LEN).astype(np.float32)
    return x, idx, labels, bank, queue


def official(args):
    if not os.path.exists(os.path.join(SRC, "models", "simmatch.py")):
        sys.exit(f"official SimMatch tree missing: {SRC}/models/simmatch.py (set $SIMMATCH_SRC)")
    torch = cs.setup_torch()
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    sys.path.insert(0, SRC)
    from models.simmatch import SimMatch
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)

    class Tiny(nn.Module):
        def __init__(self, norm_layer=None):
            super().__init__()
            self.lin = nn.Linear(IMG * IMG * 3, FEAT)
            self.bn = nn.BatchNorm1d(FEAT)
            self.out_channels = FEAT

        def forward(self, x):
            return torch.relu(self.bn(self.lin(x.permute(0, 2, 3, 1).flatten(1))))

    oargs = argparse.Namespace(DA=True, tt=T, st=T, c_smooth=ALPHA)
    model = SimMatch(Tiny, num_classes=C, eman=False, momentum=0.999, dim=DIM, K=K, args=oargs)
    with torch.no_grad():
        model.main.fc.weight.mul_(8.0)
        for pm, pe in zip(model.main.parameters(), model.ema.parameters()):
            pe.copy_(pm)
    x, idx, labels, bank, queue = inputs()
    model.bank = torch.from_numpy(bank.copy())
    model.labels = torch.from_numpy(labels.copy())
    if args.case == "filled":
        model.DA_queue = torch.from_numpy(queue.copy())
        model.DA_ptr = torch.tensor([1])
    rec = {}
    orig_da = model.distribution_alignment

    def da(probs):
        rec["p_in"] = probs.numpy().copy()
        out = orig_da(probs)
        rec["p_da"] = out.numpy().copy()
        return out

    model.distribution_alignment = da
    save = {f"w0/{n}": v for n, v in cs.state_numpy(model.main).items()}
    save.update({f"t0/{n}": v for n, v in cs.state_numpy(model.ema).items()})
    save.update({"bank0": bank, "labels": labels, "idx": idx, "queue0": model.DA_queue.numpy().copy(),
                 "ptr0": np.int64(int(model.DA_ptr))})
    save.update(x)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], LR, momentum=0.9,
                          weight_decay=args.wd, nesterov=True)
    grads = cs.grad_recorder(model.main)
    model.train()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels[idx])
    logits_x, pseudo, logits_u_s, loss_in = model(
        t(x["x"]), t(x["u_w"]), t(x["u_s"]), labels=y, index=torch.from_numpy(idx),
        start_unlabel=True, args=oargs)
    mask = (pseudo.max(1)[0] >= TAU).float()
    loss_x = F.cross_entropy(logits_x, y)
    loss_u = (-(F.log_softmax(logits_u_s, 1) * pseudo.detach()).sum(1) * mask).mean()
    loss_in = loss_in.mean()
    loss = loss_x + LAMBDA_U * loss_u + LAMBDA_IN * loss_in
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.momentum_update_ema()
    save.update({f"w1/{n}": v for n, v in cs.state_numpy(model.main).items()})
    save.update({f"t1/{n}": v for n, v in cs.state_numpy(model.ema).items()})
    save.update({f"g/{n}": v for n, v in grads.items()})
    save.update({f"rec/{n}": v for n, v in rec.items()})
    save.update({"rec/p_hat": pseudo.numpy(), "rec/mask": mask.numpy(), "loss/x": loss_x.item(),
                 "loss/u": loss_u.item(), "loss/in": loss_in.item(), "loss/total": loss.item(),
                 "bank1": model.bank.numpy(), "labels1": model.labels.numpy(),
                 "queue1": model.DA_queue.numpy(), "ptr1": np.int64(int(model.DA_ptr))})
    np.savez(args.out, **save)
    dist.destroy_process_group()
    print(f"official: SimMatch (KyleZheng1997/simmatch) case={args.case} wd={args.wd} mask rate "
          f"{mask.mean().item():.3f} -> {args.out}")


def ours(args, path):
    cs.use_tfssl()
    import keras
    import tensorflow as tf
    from tfssl.methods.simmatch import SimMatch
    from tfssl.ops import targets
    st = dict(np.load(path))
    inp = keras.Input((IMG, IMG, 3))
    h = keras.layers.Dense(FEAT, name="fc")(keras.layers.Flatten()(inp))
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")(h)
    enc = keras.Model(inp, keras.layers.ReLU()(h))
    model = SimMatch(enc, C, labeled_ids=np.arange(K), labeled_labels=st["labels"], num_train=K,
                     proj_dims=(FEAT, DIM), temperature=T, alpha=ALPHA, threshold=TAU,
                     lambda_u=LAMBDA_U, lambda_in=LAMBDA_IN, da_len=DA_LEN, bank_momentum=0.0,
                     teacher="ema", teacher_momentum=0.999, warmup_steps=0)
    opt, opt_label = cs.make_sgd(LR, args.wd)
    model.compile(optimizer=opt)
    model.optimizer.build(model.trainable_variables)

    def mapping(encoder, head, projector, prefix):
        m = {prefix + "backbone.lin.weight": (encoder.get_layer("fc").kernel, "dense_w"),
             prefix + "backbone.lin.bias": (encoder.get_layer("fc").bias, "vec")}
        bn = encoder.get_layer("bn")
        for t_, v in (("weight", bn.gamma), ("bias", bn.beta), ("running_mean", bn.moving_mean),
                      ("running_var", bn.moving_variance)):
            m[prefix + "backbone.bn." + t_] = (v, "vec")
        m[prefix + "fc.weight"] = (head.kernel, "dense_w")
        m[prefix + "fc.bias"] = (head.bias, "vec")
        for i, ti in enumerate((0, 2)):
            L = projector.get_layer(f"dense{i}")
            m[f"{prefix}head.{ti}.weight"] = (L.kernel, "dense_w")
            m[f"{prefix}head.{ti}.bias"] = (L.bias, "vec")
        return m

    student = mapping(model.encoder, model.head, model.projector, "")
    t_head = [layer for layer in model.teacher_head.layers if isinstance(layer, keras.layers.Dense)][0]
    teacher = mapping(model.teacher_encoder, t_head, model.teacher_projector, "")
    cs.load_weights(student, st, "w0/")
    cs.load_weights(teacher, st, "t0/")
    model.bank.assign(st["bank0"].T)
    if args.case == "filled":
        model.da_queue.assign(st["queue0"])
        model.da_pointer.assign(int(st["ptr0"]))
    rec = {}
    o_da, o_tce = targets.distribution_alignment, targets.thresholded_cross_entropy

    def da(p, mean, target=None):
        rec["p_in"] = p.numpy()
        out = o_da(p, mean)
        rec["p_da"] = out.numpy()
        return out

    def tce(p_hat, logits, threshold, hard=False):
        rec["p_hat"] = p_hat.numpy()
        out = o_tce(p_hat, logits, threshold, hard)
        rec["mask"] = out[1].numpy()
        return out

    targets.distribution_alignment, targets.thresholded_cross_entropy = da, tce
    grads = cs.capture_grads(model)
    idx = st["idx"]
    data = {"labeled": {"weak": tf.constant(st["x"]), "label": tf.constant(st["labels"][idx]),
                        "index": tf.constant(idx)},
            "unlabeled": {"weak": tf.constant(st["u_w"]), "strong": tf.constant(st["u_s"])}}
    logs = {n: float(v) for n, v in model.train_step(data).items()}
    targets.distribution_alignment, targets.thresholded_cross_entropy = o_da, o_tce
    rep = cs.Report(f"SimMatch vs KyleZheng1997/simmatch (EMA teacher), case={args.case}, "
                    f"official wd={args.wd} (ours: {opt_label})")
    rep.add("teacher softmax p (weak views)", st["rec/p_in"], rec["p_in"], 1e-5)
    rep.add("DA output", st["rec/p_da"], rec["p_da"], 1e-5)
    rep.add("p_hat (after propagation)", st["rec/p_hat"], rec["p_hat"], 1e-5)
    rep.add("mask", st["rec/mask"], rec["mask"], 0)
    rep.add("L_x", st["loss/x"], logs["loss_x"], 1e-5)
    rep.add("L_u", st["loss/u"], logs["loss_u"], 1e-5)
    rep.add("L_in", st["loss/in"], logs["loss_in"], 1e-5)
    rep.add("total loss", st["loss/total"], logs["loss"], 1e-5)
    rep.add("bank after step [K, D] (teacher keys, overwrite)", st["bank1"].T, model.bank.numpy(), 1e-5)
    rep.add("bank labels after step", st["labels1"], model.bank_labels.numpy(), 0)
    rep.add("DA queue after step", st["queue1"], model.da_queue.numpy(), 1e-5)
    rep.add("DA pointer after step", st["ptr1"], model.da_pointer.numpy(), 0)
    cs.compare_weights(rep, student, st, grads, "tiny")
    t_par = [n for n in teacher if "running" not in n]
    rep.add("teacher (EMA) weights after step",
            np.concatenate([cs.to_keras(st["t1/" + n], teacher[n][1]).ravel() for n in t_par]),
            np.concatenate([teacher[n][0].numpy().ravel() for n in t_par]), 1e-4)
    for s_ in ("mean", "var"):
        n = f"backbone.bn.running_{s_}"
        rep.add(f"teacher BN running_{s_} after step", st["t1/" + n], teacher[n][0].numpy(), 1e-4)
    rep.show()
    rep.dump(args.json)


if __name__ == "__main__":
    p = cs.parser(__doc__.splitlines()[0])
    a = p.parse_args()
    if a.half == "official":
        official(a)
    else:
        cs.check_setup()
        out = a.out or f"/tmp/parity_simmatch_official_{a.case}_{a.wd}.npz"
        if a.half == "both":
            print(cs.run_official(__file__, out, ["--case", a.case, "--wd", str(a.wd)]).strip())
        ours(a, out)
