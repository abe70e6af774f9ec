"""Every flags/*.cfg parses with scripts/train.py's flags into a valid TrainConfig."""

import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_parses_and_validates(train_script, path, monkeypatch):
    from tfssl import methods

    monkeypatch.chdir(ROOT)  # nested --flagfile paths are relative to the repo root
    flags = train_script.F
    flags.unparse_flags()
    flags(["train.py", f"--flagfile={path}"])
    try:
        cfg = train_script.config_from_flags()
        assert cfg.method in methods.available()
        cfg.validate()
    finally:
        flags.unparse_flags()


# The key official values of every recipe, each with its source (repository@commit
# file:line; full commits in docs/recipes.md). Keys: (flagfile, method); values:
# TrainConfig field (or "method_args.<name>") -> (expected, source). tfssl's own
# digits recipes have no official counterpart and are not listed.
USB = "microsoft/Semi-supervised-learning@1ef4cbe"
USB_SM = f"{USB} config/classic_cv/simmatch/simmatch_cifar10_40_0.yaml"
USB_FM = f"{USB} config/classic_cv/fixmatch/fixmatch_cifar10_40_0.yaml"
USB_OPT = f"{USB} semilearn/core/utils/build.py:183,209 (torch SGD, nesterov=True)"
ASCL = "MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022@6de9b3d main.py"
SUNCET = "facebookresearch/suncet@731547d configs/paws"
MIXM = "google-research/mixmatch@1011a1d"
SIMM = "KyleZheng1997/simmatch@93a7b24"
SELA = "yukimasano/self-label@3891e37"
MOCO = "facebookresearch/moco@64444f4 main_moco.py"
ASCL_IN = "MrChenFeng/Adaptive-Soft-Contrastive-Learning_ICPR2022@6de9b3d ImageNet-1K/builder.py"
_MOCO_V2 = {  # MoCo v2's ImageNet run (README: --mlp --moco-t 0.2 --aug-plus --cos)
    "optimizer": ("sgd", f"{MOCO}:286"),
    "learning_rate": (0.03, f"{MOCO} --lr default 0.03"),
    "momentum": (0.9, f"{MOCO} --momentum default 0.9"),
    "nesterov": (False, f"{MOCO}:286 (no nesterov argument)"),
    "weight_decay": (1e-4, f"{MOCO} --wd default 1e-4"),
    "weight_decay_form": ("coupled", f"{MOCO}:286 torch SGD weight_decay"),
    "weight_decay_exclude": ((), f"{MOCO}:286 SGD(model.parameters())"),
    "lr_schedule": ("cosine", f"{MOCO}:486-487 --cos"),
    "warmup_epochs": (0, f"{MOCO}:483-492 (no warm-up)"),
    "epochs": (200, f"{MOCO} --epochs default 200"),
    "unlabeled_batch_size": (256, f"{MOCO} --batch-size default 256"),
    "backbone": ("resnet50", f"{MOCO} --arch resnet50"),
    "method_args.queue_size": (65536, f"{MOCO} --moco-k default 65536"),
    "method_args.momentum": (0.999, f"{MOCO} --moco-m default 0.999"),
    "method_args.key_view": ("strong", f"{MOCO} TwoCropsTransform of aug-plus"),
}
USB_SCHED = f"{USB} semilearn/core/utils/build.py:217-238 cos(pi 7/16 k / K)"
_KEEP = ("bias", "gamma", "beta")  # biases and BN parameters never decay
_CIFAR_SGD = {  # USB's CIFAR SGD, SimMatch and FixMatch alike
    "optimizer": ("sgd", f"{USB_SM}:28"),
    "learning_rate": (0.03, f"{USB_SM}:29"),
    "momentum": (0.9, f"{USB_SM}:30"),
    "nesterov": (True, USB_OPT),
    "weight_decay": (5e-4, f"{USB_SM}:31"),
    "weight_decay_form": ("coupled", USB_OPT),
    "batch_size": (64, f"{USB_SM}:14"),
    "unlabeled_batch_size": (None, f"{USB_SM}:23 uratio 7 (None: 7 x 64)"),
    "backbone": ("wrn28_2_usb", f"{USB_SM}:37 wrn_28_2, {USB} semilearn/nets/wrn/wrn.py"),
    "ema_decay": (0.999, f"{USB_SM}:25 ema_m"),
    "lr_schedule": ("partial_cosine", USB_SCHED),
    "lr_cosine_fraction": (7 / 16, USB_SCHED),
    "weight_decay_exclude": (_KEEP, f"{USB} semilearn/core/utils/build.py:197-206 bn_wd_skip"),
}
_MIXMATCH = {  # google-research/mixmatch, the paper's CIFAR-10 setting
    "optimizer": ("adam", f"{MIXM} mixmatch.py:94 AdamOptimizer"),
    "learning_rate": (0.002, f"{MIXM} mixmatch.py:145"),
    "lr_schedule": ("constant", f"{MIXM} mixmatch.py:94"),
    "weight_decay": (0.0, f"{MIXM} mixmatch.py:92 (decay only in method_args)"),
    "batch_size": (64, f"{MIXM} mixmatch.py:144"),
    "unlabeled_batch_size": (64, f"{MIXM} mixmatch.py:52 (batch of each of x, u)"),
    "ema_decay": (0.999, f"{MIXM} mixmatch.py:137"),
    "backbone": ("wrn28_2", f"{MIXM} mixmatch.py:141-142 filters 32, repeat 4"),
    "method_args.weight_decay": (0.02, f"{MIXM} mixmatch.py:136,57,92 w <- w(1 - wd lr)"),
    "method_args.alpha": (0.75, f"{MIXM} README.md:80 --beta=0.75"),
    "method_args.temperature": (0.5, f"{MIXM} mixmatch.py:63 T=0.5"),
    "method_args.num_augmentations": (2, f"{MIXM} mixmatch.py:52 nu=2"),
    "method_args.lambda_u": (75.0, f"{MIXM} README.md:80 --w_match=75"),
    "method_args.rampup_kimg": (1024.0, f"{MIXM} mixmatch.py:52 warmup_kimg=1024"),
}
OFFICIAL = {
    ("cifar10.cfg", "simmatch"): {
        **_CIFAR_SGD,
        "method_args.threshold": (0.95, f"{USB_SM}:16"),
        "method_args.lambda_in": (1.0, f"{USB_SM}:17"),
        "method_args.lambda_u": (1.0, f"{USB_SM}:18"),
        "method_args.proj_dims": (["128", "128"], f"{USB_SM}:19"),
        "method_args.da_len": (32, f"{USB_SM}:21"),
        "method_args.alpha": (0.9, f"{USB_SM}:22"),
        "method_args.temperature": (0.1, f"{USB_SM}:24"),
        "method_args.teacher": ("online", f"{USB} semilearn/algorithms/simmatch/simmatch.py:92-93"),
        "method_args.bank_momentum": (0.7, f"{USB} semilearn/algorithms/simmatch/simmatch.py:94"),
    },
    ("cifar10.cfg", "fixmatch"): {
        **_CIFAR_SGD,
        "method_args.threshold": (0.95, f"{USB_FM}:18"),
        "method_args.lambda_u": (1.0, f"{USB_FM}:19"),
        "method_args.teacher": ("online", f"{USB} semilearn/algorithms/fixmatch/fixmatch.py"),
    },
    ("ascl_cifar10.cfg", "ascl"): {
        "optimizer": ("sgd", f"{ASCL}:59"),
        "learning_rate": (0.03, f"{ASCL}:22"),
        "momentum": (0.9, f"{ASCL}:59"),
        "nesterov": (False, f"{ASCL}:59 (no nesterov argument)"),
        "weight_decay": (5e-4, f"{ASCL}:33"),
        "weight_decay_form": ("coupled", f"{ASCL}:59 torch SGD weight_decay"),
        "weight_decay_exclude": ((), f"{ASCL}:59 SGD(model.parameters())"),
        "lr_schedule": ("cosine", f"{ASCL}:30,81 --cos, adjust_learning_rate"),
        "unlabeled_batch_size": (256, f"{ASCL}:32"),
        "epochs": (200, f"{ASCL}:27"),
        "warmup_epochs": (5, f"{ASCL}:29"),
        "backbone": ("resnet18", f"{ASCL}:21"),
        "norm": ("ghost_batch", f"{ASCL[:-7]}model.py:48 bn_splits=8"),
        "method_args.queue_size": (4096, f"{ASCL}:36"),
        "method_args.momentum": (0.99, f"{ASCL}:34"),
        "method_args.num_neighbours": (1, f"{ASCL}:41"),
        "method_args.t1": (0.1, f"{ASCL}:42"),
        "method_args.t2": (0.05, f"{ASCL}:43"),
        "method_args.kind": ("ascl", f"{ASCL}:47"),
    },
    ("moco_imagenet.cfg", "moco"): {
        **_MOCO_V2,
        "method_args.t1": (0.2, f"{MOCO} README: --moco-t 0.2"),
    },
    ("ascl_imagenet.cfg", "ascl"): {
        **_MOCO_V2,
        "method_args.queue_size": (65536, f"{ASCL_IN}:14 K=65536"),
        "method_args.momentum": (0.999, f"{ASCL_IN}:14 m=0.999"),
        "method_args.t1": (0.1, f"{ASCL_IN}:14 T1=0.1"),
        "method_args.t2": (0.05, f"{ASCL_IN}:14 T2=0.05"),
        "method_args.num_neighbours": (1, f"{ASCL_IN}:24 nn_num = 1"),
        "method_args.kind": ("ascl", f"{ASCL_IN}:161 delta-weighted pseudo labels"),
    },
    ("ascl_cifar10.cfg", "moco"): {
        "nesterov": (False, f"{ASCL}:59"),
        "weight_decay_form": ("coupled", f"{ASCL}:59"),
        "weight_decay_exclude": ((), f"{ASCL}:59"),
        "method_args.queue_size": (4096, f"{ASCL}:36"),
        "method_args.momentum": (0.99, f"{ASCL}:34"),
        "method_args.t1": (0.1, f"{ASCL}:42"),
    },
    ("paws_cifar10.cfg", "paws"): {
        "optimizer": ("lars", f"{SUNCET} (src/paws_train.py:491 LARS over SGD)"),
        "learning_rate": (3.2, f"{SUNCET}/cifar10_train.yaml:36"),
        "start_learning_rate": (0.8, f"{SUNCET}/cifar10_train.yaml:39"),
        "final_learning_rate": (0.032, f"{SUNCET}/cifar10_train.yaml:35"),
        "warmup_epochs": (10, f"{SUNCET}/cifar10_train.yaml:40"),
        "lr_schedule": ("cosine", "facebookresearch/suncet@731547d src/utils.py:67 WarmupCosineSchedule, paws_train.py:484"),
        "weight_decay_exclude": (_KEEP, f"{SUNCET} (src/paws_train.py:470-475 bias / bn excluded)"),
        "epochs": (600, f"{SUNCET}/cifar10_train.yaml:34"),
        "momentum": (0.9, f"{SUNCET}/cifar10_train.yaml:37"),
        "nesterov": (False, f"{SUNCET}/cifar10_train.yaml:38"),
        "weight_decay": (1e-6, f"{SUNCET}/cifar10_train.yaml:41"),
        "unlabeled_batch_size": (256, f"{SUNCET}/cifar10_train.yaml:8"),
        "backbone": ("wrn28_2_suncet", f"{SUNCET}/cifar10_train.yaml:28, src/wide_resnet.py"),
        "method_args.classes_per_batch": (10, f"{SUNCET}/cifar10_train.yaml:2"),
        "method_args.me_max": (True, f"{SUNCET}/cifar10_train.yaml:3"),
        "method_args.sharpen_t": (0.25, f"{SUNCET}/cifar10_train.yaml:4"),
        "method_args.imgs_per_class": (64, f"{SUNCET}/cifar10_train.yaml:5"),
        "method_args.support_views": (2, f"{SUNCET}/cifar10_train.yaml:6"),
        "method_args.temperature": (0.1, f"{SUNCET}/cifar10_train.yaml:7"),
        "method_args.label_smoothing": (0.1, f"{SUNCET}/cifar10_train.yaml:14"),
        "method_args.num_local": (6, f"{SUNCET}/cifar10_train.yaml:15"),
        "method_args.proj_dim": (128, f"{SUNCET}/cifar10_train.yaml:29"),
        "method_args.use_pred_head": (False, f"{SUNCET}/cifar10_train.yaml:32"),
    },
    ("paws_imagenet.cfg", "paws"): {
        "optimizer": ("lars", f"{SUNCET} (src/paws_train.py:491)"),
        "learning_rate": (6.4, f"{SUNCET}/imgnt_train.yaml:36"),
        "start_learning_rate": (0.3, f"{SUNCET}/imgnt_train.yaml:39"),
        "final_learning_rate": (0.064, f"{SUNCET}/imgnt_train.yaml:35"),
        "epochs": (100, f"{SUNCET}/imgnt_train.yaml:34"),
        "nesterov": (False, f"{SUNCET}/imgnt_train.yaml:38"),
        "weight_decay": (1e-6, f"{SUNCET}/imgnt_train.yaml:41"),
        "weight_decay_exclude": (_KEEP, f"{SUNCET} (src/paws_train.py:470-475)"),
        "unlabeled_batch_size": (4096, f"{SUNCET}/imgnt_train.yaml:8 (64 x 64 GPUs)"),
        "method_args.num_local": (6, f"{SUNCET}/imgnt_train.yaml:15"),
        "method_args.finetune_epochs": (50, f"{SUNCET}/imgnt_fine_tune.yaml:23"),
        "method_args.finetune_lr": (0.02, f"{SUNCET}/imgnt_fine_tune.yaml:24"),
    },
    ("simmatch_imagenet.cfg", "simmatch"): {
        "optimizer": ("sgd", f"{SIMM} simmatch.py:225"),
        "learning_rate": (0.03, f"{SIMM} script/train.sh:4 --lr 0.03"),
        "momentum": (0.9, f"{SIMM} simmatch.py:70"),
        "nesterov": (True, f"{SIMM} script/train.sh:4 --nesterov"),
        "weight_decay": (1e-4, f"{SIMM} simmatch.py:72"),
        "weight_decay_form": ("coupled", f"{SIMM} simmatch.py:225-228 torch SGD"),
        "weight_decay_exclude": ((), f"{SIMM} simmatch.py:225 SGD(model.parameters())"),
        "lr_schedule": ("cosine", f"{SIMM} utils/lr_schedule.py:20-23 (--cos)"),
        "batch_size": (64, f"{SIMM} simmatch.py:59 (8 per GPU x 8 GPUs)"),
        "unlabeled_batch_size": (320, f"{SIMM} simmatch.py:115 mu 5"),
        "epochs": (400, f"{SIMM} script/train.sh:4 --epochs 400"),
        "warmup_epochs": (5, f"{SIMM} script/train.sh:4 --warmup-epoch 5"),
        "backbone": ("resnet50", f"{SIMM} README.md:22"),
        "method_args.threshold": (0.7, f"{SIMM} simmatch.py:119"),
        "method_args.lambda_u": (10.0, f"{SIMM} simmatch.py:117"),
        "method_args.lambda_in": (5.0, f"{SIMM} script/train.sh:4 --lambda_in 5"),
        "method_args.alpha": (0.9, f"{SIMM} script/train.sh:4 --c_smooth 0.9"),
        "method_args.temperature": (0.1, f"{SIMM} script/train.sh:4 --st 0.1 --tt 0.1"),
        "method_args.da_len": (256, f"{SIMM} models/simmatch.py:49"),
        "method_args.teacher": ("ema", f"{SIMM} models/simmatch.py:38,53-65"),
        "method_args.teacher_momentum": (0.999, f"{SIMM} simmatch.py:123"),
    },
    ("sela_cifar10.cfg", "sela"): {
        "learning_rate": (0.03, f"{SELA} scripts/cifar.sh:16"),
        "epochs": (400, f"{SELA} scripts/cifar.sh:11"),
        "nesterov": (False, f"{SELA} cifar.py:206"),
        "weight_decay": (5e-4, f"{SELA} cifar.py:206"),
        "weight_decay_form": ("coupled", f"{SELA} cifar.py:206 torch SGD"),
        "weight_decay_exclude": ((), f"{SELA} cifar.py:206 SGD(model.parameters())"),
        "lr_schedule": ("step", f"{SELA} cifar.py:254-258"),
        "lr_step_epochs": ((240, 320), f"{SELA} cifar.py:256 0.1^((epoch - 160) // 80)"),
        "lr_step_factor": (0.1, f"{SELA} cifar.py:256"),
        "unlabeled_batch_size": (128, f"{SELA} scripts/cifar.sh:15"),
        "method_args.num_clusters": (128, f"{SELA} scripts/cifar.sh:5-6"),
        "method_args.num_heads": (10, f"{SELA} scripts/cifar.sh:5"),
        "method_args.lam": (10.0, f"{SELA} cifar.py:121"),
    },
    ("sela_imagenet.cfg", "sela"): {
        "learning_rate": (0.08, f"{SELA} main.py:180"),
        "nesterov": (False, f"{SELA} main.py:137-140"),
        "weight_decay": (1e-5, f"{SELA} main.py:182 10^-5"),
        "weight_decay_exclude": ((), f"{SELA} main.py:137 all requires_grad parameters"),
        "lr_schedule": ("step", f"{SELA} main.py:28-29"),
        "lr_step_epochs": ((150, 300, 350), f"{SELA} main.py:28-29,181 --lrdrop 150"),
        "lr_step_factor": (0.1, f"{SELA} main.py:28"),
        "unlabeled_batch_size": (256, f"{SELA} scripts/resnet.sh:13"),
        "method_args.num_clusters": (3000, f"{SELA} scripts/resnet.sh:9"),
        "method_args.num_heads": (10, f"{SELA} scripts/resnet.sh:8"),
        "method_args.lam": (25.0, f"{SELA} main.py:188"),
    },
    ("mixmatch_cifar10_250.cfg", "mixmatch"): _MIXMATCH,
    ("mixmatch_cifar10_4000.cfg", "mixmatch"): _MIXMATCH,
    ("mixmatch_svhn.cfg", "mixmatch"): {
        **_MIXMATCH,
        "method_args.lambda_u": (250.0, f"{MIXM} runs/table6.sh:25 --w_match=250"),
    },
    ("mixmatch_stl10.cfg", "mixmatch"): {
        **{k: v for k, v in _MIXMATCH.items() if k != "backbone"},
        "backbone": ("wrn28_2_s4", f"{MIXM} runs/table2.sh:18 --scales=4"),
        "method_args.lambda_u": (50.0, f"{MIXM} runs/table2.sh:18 --w_match=50"),
    },
    ("mixmatch_cifar100.cfg", "mixmatch"): {
        **{k: v for k, v in _MIXMATCH.items() if k != "backbone"},
        "backbone": ("wrn28_f135", f"{MIXM} runs/table1.sh:18 --filters=135"),
        "labels_per_class": (100, f"{MIXM} runs/table1.sh:21 cifar100@10000"),
        "method_args.lambda_u": (150.0, f"{MIXM} runs/table1.sh:21 --w_match=150"),
        "method_args.weight_decay": (0.04, f"{MIXM} runs/table1.sh:18 --wd=0.04"),
    },
}


def _recipe_extras():
    """(flagfile, method) -> the command line tests/test_recipes.py runs it with."""
    spec = importlib.util.spec_from_file_location(
        "_tfssl_test_recipes_table", os.path.join(ROOT, "tests", "test_recipes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {(r.flagfile, r.method): r.extra for r in module.RECIPES}


RECIPE_EXTRAS = _recipe_extras()


@pytest.mark.parametrize("key", sorted(OFFICIAL), ids=lambda k: f"{k[0][:-4]}-{k[1]}")
def test_flagfile_carries_the_official_values(train_script, key, monkeypatch):
    """The recipe (flagfile + the command line test_recipes runs it with) parses
    to the official values in OFFICIAL. Mutants caught: editing any listed value
    in a flagfile, e.g. --simmatch_bank_momentum=0.7 -> 0 or --nonesterov ->
    --nesterov in flags/ascl_cifar10.cfg, or dropping --weight_decay_form=coupled
    from flags/cifar10.cfg (the decoupled default is about 10x weaker)."""
    flagfile, method = key
    assert key in RECIPE_EXTRAS, f"{key} is not a recipe in tests/test_recipes.py"
    monkeypatch.chdir(ROOT)
    flags = train_script.F
    flags.unparse_flags()
    flags(["train.py", f"--flagfile=flags/{flagfile}", *RECIPE_EXTRAS[key], f"--method={method}"])
    try:
        cfg = train_script.config_from_flags()
        from tfssl.train import weight_decay_form
        wrong = {}
        for name, (expected, source) in OFFICIAL[key].items():
            if name.startswith("method_args."):
                got = cfg.method_args[name.split(".", 1)[1]]
            elif name == "weight_decay_form":
                got = weight_decay_form(cfg)
            else:
                got = getattr(cfg, name)
            if got != expected and not (isinstance(expected, float) and got is not None
                                        and abs(got - expected) <= 1e-12 * abs(expected)):
                wrong[name] = f"{got!r}, official {expected!r} ({source})"
        assert not wrong, wrong
    finally:
        flags.unparse_flags()
