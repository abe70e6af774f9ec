"""MixMatch parity: USB's MixMatch (CIFAR config: K = 2 unlabeled views, T 0.5, Beta(0.5),
lambda_u 100 with the linear ramp) against tfssl.methods.MixMatch, one step.

Set-up, trees and the two halves: see common_semi.py. Run (main Python):

    python benchmarks/parity/mixmatch.py --net tiny               # no BN: exact comparison
    python benchmarks/parity/mixmatch.py --net wrn                # WRN-28-2, interleaved (ours)
    python benchmarks/parity/mixmatch.py --net wrn --case concat  # ours with interleave=False
    python benchmarks/parity/mixmatch.py --net wrn --case separate  # ours, forwards as USB's

The official MixUp draw (one lambda per batch from np.random.beta, one torch.randperm) is
recorded by replaying the RNG state around USB's own ``mixup_one_target``, and fed to ours
in place of its stateless per-row draws (``tfssl.ops.targets.mixup_draws`` is swapped for
the run). The ramp is taken mid-way (USB ``it`` = 100 of 1000 x 0.4; ours
``optimizer.iterations`` = 100, ``rampup_images`` = 0.4 x 1000 x B), so L_u counts with
weight 25. Compared: the guessed labels, the mixed inputs and targets, L_x, L_u, the total
loss, per-layer gradient norms, the weights after USB's SGD, BN statistics and the EMA.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import common_semi as cs  # noqa: E402

C, B, IT, ITERS, WARM, LAMBDA_U, ALPHA = 10, 8, 100, 1000, 0.4, 100.0, 0.5


def sizes(net):
    return (8, 16) if net == "tiny" else (32, 128)


def inputs(net):
    image, _ = sizes(net)
    rng = np.random.default_rng(2)
    x = {n: rng.normal(size=(B, image, image, 3)).astype(np.float32)
         for n in ("x_lb", "x_ulb_w", "x_ulb_s")}
    return x, rng.integers(0, C, B).astype(np.int64)


def official(args):
    torch = cs.setup_torch(f64=args.f64)
    image, feat = sizes(args.net)
    if args.net == "wrn":
        cs._stub(["wandb", "aim", "torchaudio"])
        sys.path.insert(0, cs.USB_SRC)
        cs.patch_usb_wrn_tf_form()
    alg, cfg = cs.build_usb("mixmatch", args.net, dict(
        num_labels=40, lb_dest_len=40, ulb_dest_len=1000, batch_size=B, uratio=1,
        weight_decay=args.wd, num_train_iter=ITERS, unsup_warm_up=WARM,
        ulb_loss_ratio=LAMBDA_U, mixup_alpha=ALPHA, T=0.5), image, feat)
    cs.finish_usb_init(alg, args.net, args.init)
    alg.it = IT
    from semilearn.algorithms.mixmatch import mixmatch as usb_mm
    rec = {}
    orig = usb_mm.mixup_one_target

    def recorded(x, y, alpha=1.0, is_bias=False):
        np_state, t_state = np.random.get_state(), torch.get_rng_state()
        out = orig(x, y, alpha, is_bias)
        after_np, after_t = np.random.get_state(), torch.get_rng_state()
        np.random.set_state(np_state)
        torch.set_rng_state(t_state)
        lam = np.random.beta(alpha, alpha)  # the same draws, replayed
        index = torch.randperm(x.size(0))
        np.random.set_state(after_np)
        torch.set_rng_state(after_t)
        rec.update(lam=np.float64(max(lam, 1 - lam) if is_bias else lam), perm=index.numpy(),
                   mix_in_y=y.numpy().copy(), mixed_x=out[0].numpy().copy(),
                   mixed_y=out[1].numpy().copy(), out_lam=np.float64(out[2]))
        return out

    usb_mm.mixup_one_target = recorded
    x, y = inputs(args.net)
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
                 "loss/u": ld["train/unsup_loss"], "lr": alg.optimizer.param_groups[0]["lr"]})
    np.savez(args.out, **save)
    print(f"official: MixMatch (USB {cs.usb_commit()[:12]}) net={args.net} wd={args.wd} "
          f"lambda'={rec['lam']:.4f} (returned {rec['out_lam']:.4f}) -> {args.out}")


def ours(args, path, path64=None):
    cs.use_tfssl()
    import tensorflow as tf
    from tfssl.methods.mixmatch import MixMatch
    from tfssl.ops import targets
    st = dict(np.load(path))
    st64 = dict(np.load(path64)) if path64 else None
    image, feat = sizes(args.net)
    enc = cs.keras_tiny_encoder(image, feat) if args.net == "tiny" else cs.keras_wrn()
    model = MixMatch(enc, C, num_augmentations=2, temperature=0.5, alpha=ALPHA,
                     lambda_u=LAMBDA_U, rampup_images=int(WARM * ITERS * B), weight_decay=0.0,
                     ema_decay=0.999, interleave=args.case != "concat")
    opt, opt_label = cs.make_sgd(float(st["lr"]), args.wd)
    model.compile(optimizer=opt)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(IT)
    mapping = cs.torch_to_keras_map(model, "", args.net)
    cs.load_weights(mapping, st)
    for e, v in model._ema_pairs:
        e.assign(v)
    if args.case == "separate":  # USB's form, for this comparison only: K+1 separate
        def separate(xs):            # forwards, no interleave, first keeps its BN updates
            logits = [tf.cast(model(xs[0], training=True), tf.float32)]
            bn = model._bn_read()
            logits += [tf.cast(model(t, training=True), tf.float32) for t in xs[1:]]
            model._bn_write(bn)
            return logits
        model._forwards = separate
    rec = {}
    o_draws, o_mix = targets.mixup_draws, targets.mixup

    def draws(n, alpha, seed):  # the official draw: one lambda for the batch, its permutation
        return tf.fill([n], tf.constant(float(st["rec/lam"]), tf.float32)), tf.constant(
            st["rec/perm"].astype(np.int32))

    def mix(x, p, lam, perm):
        rec["mix_in_y"] = p.numpy()
        out = o_mix(x, p, lam, perm)
        rec["mixed_x"], rec["mixed_y"] = out[0].numpy(), out[1].numpy()
        return out

    targets.mixup_draws, targets.mixup = draws, mix
    grads = cs.capture_grads(model)
    data = {"labeled": {"weak": tf.constant(st["x_lb"]), "label": tf.constant(st["y"])},
            "unlabeled": {"aug0": tf.constant(st["x_ulb_w"]), "aug1": tf.constant(st["x_ulb_s"])}}
    logs = {n: float(v) for n, v in model.train_step(data).items()}
    targets.mixup_draws, targets.mixup = o_draws, o_mix
    mode = {"concat": "one concatenated forward", "separate": "USB's separate forwards (shim)"}.get(
        args.case, "interleaved forwards")
    rep = cs.Report(f"MixMatch vs USB, net={args.net}, ours: {mode}, official wd={args.wd} "
                    f"(ours: {opt_label})")
    rep.add("guessed labels q (sharpened mean)", st["rec/mix_in_y"][B:2 * B],
            rec["mix_in_y"][B:2 * B], 1e-5)
    rep.add("MixUp targets in [onehot, q, q]", st["rec/mix_in_y"], rec["mix_in_y"], 1e-5)
    rep.add("mixed inputs (NHWC)", st["rec/mixed_x"].transpose(0, 2, 3, 1), rec["mixed_x"], 1e-5)
    rep.add("mixed targets", st["rec/mixed_y"], rec["mixed_y"], 1e-5)
    rep.add("L_x", st["loss/x"], logs["loss_x"], 1e-5)
    rep.add("L_u (mean over rows and classes)", st["loss/u"], logs["loss_u"], 1e-5)
    rep.add("w(t) = lambda_u x ramp", LAMBDA_U * min(IT / (WARM * ITERS), 1.0), logs["w_u"], 1e-6)
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
