"""FixMatch parity: USB's FixMatch (CIFAR config: hard labels, online teacher, one
concatenated forward) against tfssl.methods.FixMatch, one step.

Set-up, trees and the two halves: see common_semi.py. Run (main Python):

    python benchmarks/parity/fixmatch.py --net tiny
    python benchmarks/parity/fixmatch.py --net wrn          # WRN-28-2, weights copied
    python benchmarks/parity/fixmatch.py --net tiny --wd 5e-4

Compared: the teacher probabilities, hard pseudo-labels and mask; L_x, L_u and the total
loss; per-layer gradient norms, the weights after USB's SGD, BN statistics and the EMA
weights (0.999). No bank or DA state in FixMatch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import common_semi as cs  # noqa: E402

C, B, URATIO = 10, 8, 2
TAU = {"tiny": 0.6, "wrn": 0.3}  # thresholds that let some rows through


def sizes(net):
    return (8, 16) if net == "tiny" else (32, 128)


def inputs(net):
    image, _ = sizes(net)
    rng = np.random.default_rng(1)
    nu = B * URATIO
    x = {"x_lb": rng.normal(size=(B, image, image, 3)), "x_ulb_w": rng.normal(size=(nu, image, image, 3)),
         "x_ulb_s": rng.normal(size=(nu, image, image, 3))}
    return {n: v.astype(np.float32) for n, v in x.items()}, rng.integers(0, C, B).astype(np.int64)


def official(args):
    torch = cs.setup_torch(f64=args.f64)
    image, feat = sizes(args.net)
    if args.net == "wrn":
        cs._stub(["wandb", "aim", "torchaudio"])
        sys.path.insert(0, cs.USB_SRC)
        cs.patch_usb_wrn_tf_form()
    alg, cfg = cs.build_usb("fixmatch", args.net, dict(
        num_labels=40, lb_dest_len=40, ulb_dest_len=1000, batch_size=B, uratio=URATIO,
        p_cutoff=TAU[args.net], weight_decay=args.wd), image, feat)
    cs.finish_usb_init(alg, args.net, args.init)
    x, y = inputs(args.net)
    rec = {}
    mh, ph = alg.hooks_dict["MaskingHook"], alg.hooks_dict["PseudoLabelingHook"]
    orig_mask, orig_pl = mh.masking, ph.gen_ulb_targets

    def masking(algorithm, logits_x_ulb, softmax_x_ulb=True, *a, **kw):
        rec["p"] = logits_x_ulb.detach().numpy().copy()
        out = orig_mask(algorithm, logits_x_ulb, softmax_x_ulb, *a, **kw)
        rec["mask"] = out.numpy().copy()
        return out

    def gen(algorithm, logits, *a, **kw):
        out = orig_pl(algorithm, logits, *a, **kw)
        rec["pseudo"] = out.numpy().copy()
        return out

    mh.masking, ph.gen_ulb_targets = masking, gen
    save = {f"w0/{n}": v for n, v in cs.state_numpy(alg.model).items()}
    save.update(x)
    save["y"] = y
    grads = cs.grad_recorder(alg.model)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(
        torch.get_default_dtype())
    cs.official_step(alg, {"x_lb": t(x["x_lb"]), "y_lb": torch.from_numpy(y),
                           "x_ulb_w": t(x["x_ulb_w"]), "x_ulb_s": t(x["x_ulb_s"])})
    save.update({f"w1/{n}": v for n, v in cs.state_numpy(alg.model).items()})
    save.update({f"g/{n}": v for n, v in grads.items()})
    save.update({f"ema/{n}": v.numpy() for n, v in alg.ema.shadow.items()})
    save.update({f"rec/{n}": v for n, v in rec.items()})
    ld = alg.log_dict
    save.update({"loss/total": ld["train/total_loss"], "loss/x": ld["train/sup_loss"],
                 "loss/u": ld["train/unsup_loss"], "lr": alg.optimizer.param_groups[0]["lr"],
                 "mask_rate": float(rec["mask"].mean())})
    np.savez(args.out, **save)
    print(f"official: FixMatch (USB {cs.usb_commit()[:12]}) net={args.net} wd={args.wd} "
          f"mask rate {save['mask_rate']:.3f} -> {args.out}")


def ours(args, path, path64=None):
    cs.use_tfssl()
    import tensorflow as tf
    from tfssl.methods.simmatch import FixMatch
    from tfssl.ops import targets
    st = dict(np.load(path))
    st64 = dict(np.load(path64)) if path64 else None
    image, feat = sizes(args.net)
    enc = cs.keras_tiny_encoder(image, feat) if args.net == "tiny" else cs.keras_wrn()
    model = FixMatch(enc, C, threshold=TAU[args.net], lambda_u=1.0, teacher="online", ema_decay=0.999)
    opt, opt_label = cs.make_sgd(float(st["lr"]), args.wd)
    model.compile(optimizer=opt)
    model.optimizer.build(model.trainable_variables)
    mapping = cs.torch_to_keras_map(model, "", args.net)
    cs.load_weights(mapping, st)
    for e, v in model._ema_pairs:
        e.assign(v)
    rec = {}
    o_tce = targets.thresholded_cross_entropy

    def tce(p_hat, logits, threshold, hard=False):
        rec["p"], rec["pseudo"] = p_hat.numpy(), np.argmax(p_hat.numpy(), -1)
        out = o_tce(p_hat, logits, threshold, hard)
        rec["mask"] = out[1].numpy()
        return out

    targets.thresholded_cross_entropy = tce
    grads = cs.capture_grads(model)
    data = {"labeled": {"weak": tf.constant(st["x_lb"]), "label": tf.constant(st["y"]),
                        "index": tf.range(B, dtype=tf.int64)},
            "unlabeled": {"weak": tf.constant(st["x_ulb_w"]), "strong": tf.constant(st["x_ulb_s"])}}
    logs = {n: float(v) for n, v in model.train_step(data).items()}
    targets.thresholded_cross_entropy = o_tce
    rep = cs.Report(f"FixMatch vs USB, net={args.net}, official wd={args.wd} (ours: {opt_label})")
    rep.add("teacher probabilities p", st["rec/p"], rec["p"], 1e-5)
    rep.add("hard pseudo-labels (argmax)", st["rec/pseudo"], rec["pseudo"], 0)
    rep.add("mask", st["rec/mask"], rec["mask"], 0)
    rep.add("L_x", st["loss/x"], logs["loss_x"], 1e-5)
    rep.add("L_u", st["loss/u"], logs["loss_u"], 1e-5)
    rep.add("total loss", st["loss/total"], logs["loss"], 1e-5)
    cs.compare_weights(rep, mapping, st, grads, args.net, st64=st64)
    cs.compare_ema(rep, model, mapping, st)
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
