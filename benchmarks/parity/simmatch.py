"""SimMatch parity: USB's SimMatch (CIFAR setting: online teacher, bank momentum 0.7,
DA queue, label propagation live) against tfssl.methods.SimMatch, one step.

Set-up, trees and the two halves: see common_semi.py. Run (main Python):

    python benchmarks/parity/simmatch.py --net tiny --case filled
    python benchmarks/parity/simmatch.py --net tiny --case fresh     # DA queue as each inits it
    python benchmarks/parity/simmatch.py --net wrn --case filled     # WRN-28-2, weights copied
    python benchmarks/parity/simmatch.py --net tiny --wd 5e-4        # coupled decay (official)

Compared: the DA output, the pseudo-targets p_hat and the mask, L_x, L_u, L_in and the total
loss; the bank and the DA queue / pointer after the step; per-layer gradient norms, the
weights after USB's SGD (nesterov, lr 0.03, momentum 0.9), BN statistics and the EMA
(0.999) weights. Both sides start from the same weights, bank, bank labels and DA queue
(``--case fresh``: each side's own initial DA queue, a known difference).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import common_semi as cs  # noqa: E402

C, B, URATIO, DA_LEN, PROJ, T = 10, 8, 2, 4, 128, 0.1
TAU = {"tiny": 0.5, "wrn": 0.3}  # thresholds that let some rows through


def sizes(net):
    return (8, 16, 12) if net == "tiny" else (32, 128, 40)  # image, feat_dim, K


def inputs(net):
    image, _, k = sizes(net)
    rng = np.random.default_rng(0)
    nu = B * URATIO
    idx = rng.choice(k, B, replace=False)
    idx[-1] = idx[0]  # a labeled image twice in the batch (40 labels, batch 64 in USB)
    x = {"x_lb": rng.normal(size=(B, image, image, 3)), "x_ulb_w": rng.normal(size=(nu, image, image, 3)),
         "x_ulb_s": rng.normal(size=(nu, image, image, 3))}
    x = {n: v.astype(np.float32) for n, v in x.items()}
    labels = rng.integers(0, C, k)
    bank = rng.normal(size=(PROJ, k)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=0, keepdims=True)
    p_model = rng.dirichlet(np.ones(C), DA_LEN).astype(np.float32)
    return x, idx.astype(np.int64), labels.astype(np.int64), bank, p_model


def official(args):
    torch = cs.setup_torch(f64=args.f64)
    image, feat, k = sizes(args.net)
    if args.net == "wrn":
        cs._stub(["wandb", "aim", "torchaudio"])
        sys.path.insert(0, cs.USB_SRC)
        cs.patch_usb_wrn_tf_form()
    alg, cfg = cs.build_usb("simmatch", args.net, dict(
        num_labels=k, lb_dest_len=k, ulb_dest_len=1000, batch_size=B, uratio=URATIO,
        p_cutoff=TAU[args.net], da_len=DA_LEN, use_epass=False, weight_decay=args.wd, T=T), image, feat)
    cs.finish_usb_init(alg, args.net, args.init)
    alg.epoch = 1  # past the warm-up epoch: label propagation and L_in live
    x, idx, labels, bank, p_model = inputs(args.net)
    alg.mem_bank = torch.from_numpy(bank.copy()).to(torch.get_default_dtype())
    alg.labels_bank = torch.from_numpy(labels.copy())
    da = alg.hooks_dict["DistAlignHook"]
    if args.case == "filled":
        da.p_model = torch.from_numpy(p_model.copy()).to(torch.get_default_dtype())
        da.p_model_ptr = torch.tensor([1])
    rec = {}
    orig_da, orig_mask = da.dist_align, alg.hooks_dict["MaskingHook"].masking

    def dist_align(algorithm, probs_x_ulb, probs_x_lb=None):
        rec["p_in"] = probs_x_ulb.numpy().copy()
        out = orig_da(algorithm, probs_x_ulb, probs_x_lb)
        rec["p_da"] = out.numpy().copy()
        return out

    def masking(algorithm, logits_x_ulb, softmax_x_ulb=True, *a, **kw):
        rec["p_hat"] = logits_x_ulb.detach().numpy().copy()
        out = orig_mask(algorithm, logits_x_ulb, softmax_x_ulb, *a, **kw)
        rec["mask"] = out.numpy().copy()
        return out

    da.dist_align = dist_align
    orig_update = alg.update_bank

    def update_bank(k_, labels_, index_):
        rec["bank_k"] = k_.detach().numpy().copy()
        return orig_update(k_, labels_, index_)

    alg.update_bank = update_bank
    alg.hooks_dict["MaskingHook"].masking = masking
    save = {f"w0/{n}": v for n, v in cs.state_numpy(alg.model).items()}
    save.update({"bank0": bank, "labels": labels, "p_model0": da.p_model.numpy().copy(),
                 "ptr0": np.int64(int(da.p_model_ptr)), "idx": idx})
    save.update({n: v for n, v in x.items()})
    grads = cs.grad_recorder(alg.model)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(
        torch.get_default_dtype())
    batch = {"idx_lb": torch.from_numpy(idx), "x_lb": t(x["x_lb"]), "y_lb": torch.from_numpy(labels[idx]),
             "x_ulb_w": t(x["x_ulb_w"]), "x_ulb_s": t(x["x_ulb_s"])}
    cs.official_step(alg, batch)
    save.update({f"w1/{n}": v for n, v in cs.state_numpy(alg.model).items()})
    save.update({f"g/{n}": v for n, v in grads.items()})
    save.update({f"ema/{n}": v.numpy() for n, v in alg.ema.shadow.items()})
    save.update({f"rec/{n}": v for n, v in rec.items()})
    ld = alg.log_dict
    sup, unsup, total = ld["train/sup_loss"], ld["train/unsup_loss"], ld["train/total_loss"]
    save.update({"loss/total": total, "loss/x": sup, "loss/u": unsup,
                 "loss/in": (total - sup - alg.lambda_u * unsup) / alg.lambda_in,
                 "bank1": alg.mem_bank.numpy(), "p_model1": da.p_model.numpy(),
                 "ptr1": np.int64(int(da.p_model_ptr)), "lr": alg.optimizer.param_groups[0]["lr"],
                 "mask_rate": float(rec["mask"].mean())})
    if args.net == "wrn":
        w0 = {n[len("backbone."):]: save[f"w0/{n}"] for n in cs.state_numpy(alg.model)
              if n.startswith("backbone.")}
        fwd = cs.usb_wrn_forward_variants(w0, np.ascontiguousarray(
            x["x_ulb_w"].transpose(0, 3, 1, 2)), C)
        save.update({f"fwd/{n}": v for n, v in fwd.items()})
    np.savez(args.out, **save)
    print(f"official: SimMatch (USB {cs.usb_commit()[:12]}) net={args.net} case={args.case} "
          f"wd={args.wd} mask rate {save['mask_rate']:.3f} -> {args.out}")


def ours(args, path, path64=None):
    cs.use_tfssl()
    import tensorflow as tf
    from tfssl.methods.simmatch import SimMatch
    from tfssl.ops import targets
    st = dict(np.load(path))
    st64 = dict(np.load(path64)) if path64 else None
    image, feat, k = sizes(args.net)
    enc = cs.keras_tiny_encoder(image, feat) if args.net == "tiny" else cs.keras_wrn()
    model = SimMatch(enc, C, labeled_ids=np.arange(k), labeled_labels=st["labels"], num_train=k,
                     proj_dims=(feat, PROJ), temperature=T, alpha=0.9, threshold=TAU[args.net], lambda_u=1.0,
                     lambda_in=1.0, da_len=DA_LEN, bank_momentum=0.7, teacher="online",
                     warmup_steps=0, ema_decay=0.999)
    opt, opt_label = cs.make_sgd(float(st["lr"]), args.wd)
    model.compile(optimizer=opt)
    model.optimizer.build(model.trainable_variables)
    mapping = cs.torch_to_keras_map(model, "backbone.", args.net, model.projector, "mlp_proj.")
    cs.load_weights(mapping, st)
    if model._ema_pairs:
        for e, v in model._ema_pairs:
            e.assign(v)
    fwd = None
    if args.net == "wrn":  # train-mode forward on the initial weights, then reload them
        fwd = model.head(enc(tf.constant(st["x_ulb_w"]), training=True)).numpy()
        cs.load_weights(mapping, st)
    model.bank.assign(st["bank0"].T)
    if args.case == "filled":
        model.da_queue.assign(st["p_model0"])
        model.da_pointer.assign(int(st["ptr0"]))
    rec = {}
    o_da, o_tce = targets.distribution_alignment, targets.thresholded_cross_entropy

    def da(p, mean, target=None):
        rec["p_in"] = p.numpy()
        out = o_da(p, mean) if target is None else o_da(p, mean, target)
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
    data = {"labeled": {"weak": tf.constant(st["x_lb"]), "label": tf.constant(st["labels"][idx]),
                        "index": tf.constant(idx)},
            "unlabeled": {"weak": tf.constant(st["x_ulb_w"]), "strong": tf.constant(st["x_ulb_s"])}}
    logs = {n: float(v) for n, v in model.train_step(data).items()}
    targets.distribution_alignment, targets.thresholded_cross_entropy = o_da, o_tce

    rep = cs.Report(f"SimMatch vs USB, net={args.net}, case={args.case}, official wd={args.wd} "
                    f"(ours: {opt_label})")
    rep.add("DA input p (teacher softmax)", st["rec/p_in"], rec["p_in"], 1e-5)
    rep.add("DA output", st["rec/p_da"], rec["p_da"], 1e-5)
    if args.case == "fresh":  # USB: zero-initialised queue, mean over all its rows
        q0 = np.zeros_like(st["p_model0"])
        q0[int(st["ptr0"])] = st["rec/p_in"].mean(0)
        da_np = st["rec/p_in"] * (0.1 + 1e-6) / (q0.mean(0) + 1e-6)
        rep.add("  repro: NumPy DA on a zero-initialised queue", st["rec/p_da"],
                da_np / da_np.sum(-1, keepdims=True), 1e-5)
        filled = st["rec/p_in"] * (0.1 + 1e-6) / (st["rec/p_in"].mean(0) + 1e-6)
        rep.add("  NumPy DA, mean over filled rows only", st["rec/p_da"],
                filled / filled.sum(-1, keepdims=True), 1e-5)
    rep.add("p_hat (pseudo-target after propagation)", st["rec/p_hat"], rec["p_hat"], 1e-5)
    rep.add("mask", st["rec/mask"], rec["mask"], 0)
    rep.add("L_x", st["loss/x"], logs["loss_x"], 1e-5)
    rep.add("L_u", st["loss/u"], logs["loss_u"], 1e-5)
    rep.add("L_in", st["loss/in"], logs["loss_in"], 1e-5, note="official: total - L_x - L_u")
    rep.add("total loss", st["loss/total"], logs["loss"], 1e-5)
    # The bank write. USB (simmatch.py:142) blends with F.normalize(..., dim=1) on the
    # [D, n] slice: each feature dimension is normalised across the n written entries,
    # not each entry across its D dimensions. Reproduced in NumPy from the recorded keys.
    k_off, b0 = st["rec/bank_k"], st["bank0"]
    last = {int(i): j for j, i in enumerate(idx)}  # last occurrence of each index
    blend = 0.7 * b0[:, idx] + 0.3 * k_off.T
    usb_axis = blend / np.linalg.norm(blend, axis=1, keepdims=True)
    per_entry = blend / np.linalg.norm(blend, axis=0, keepdims=True)
    repro, fixed = b0.copy(), b0.copy()
    for i, j in last.items():
        repro[:, i], fixed[:, i] = usb_axis[:, j], per_entry[:, j]
    rep.add("bank after step [K, D] vs USB", st["bank1"].T, model.bank.numpy(), 1e-5,
            note="USB normalises over the batch axis")
    rep.add("  repro: NumPy USB formula (dim=1) vs USB", st["bank1"], repro, 1e-5)
    rep.add("  ours vs USB formula, per-entry normalised", fixed.T, model.bank.numpy(), 1e-5)
    rep.add("  norms of USB's written bank entries", np.ones(len(last)),
            np.linalg.norm(st["bank1"][:, sorted(last)], axis=0), 1e-5, note="ours: 1")
    rep.add("DA queue after step", st["p_model1"], model.da_queue.numpy(), 1e-5)
    rep.add("DA pointer after step", st["ptr1"], model.da_pointer.numpy(), 0)
    cs.compare_weights(rep, mapping, st, grads, args.net, st64=st64)
    cs.compare_ema(rep, model, mapping, st)
    if args.net == "wrn":
        for name in ("usb", "conv1_on_activated", "tf_same_padding", "bn_eps_1e-3", "stem_bias_zero"):
            rep.add(f"WRN fwd logits, USB +{name}" if name != "usb" else "WRN fwd logits, USB unpatched",
                    st[f"fwd/{name}"], fwd, 1e-4, note="initial weights; patches cumulative")
    rep.show()
    rep.dump(args.json)
    return rep


if __name__ == "__main__":
    p = cs.parser(__doc__.splitlines()[0])
    a = p.parse_args()
    extra = ["--net", a.net, "--wd", str(a.wd), "--case", a.case]
    if a.half == "official":
        official(a)
    else:
        path, path64 = cs.main_both(__file__, a, extra) if a.half == "both" else (a.out, None)
        ours(a, path, path64)
