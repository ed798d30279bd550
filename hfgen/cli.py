"""The `hfgen` command: `hfgen train <family> ...`, `hfgen sample <folder> ...`, `hfgen evaluate <folder> ...`,
`hfgen demo <folder> ...`, `hfgen distill <teacher> ...` and `hfgen push <folder> <repo_id>`.

`hfgen train vae ARGS` runs exactly what `accelerate launch -m hfgen.training.train_vae ARGS` runs.
"""

import importlib
import json
import os
import sys

from hfgen.utils import CommandParser

TRAINERS = {"vae": "hfgen.training.train_vae", "gan": "hfgen.training.train_gan", "ddpm": "hfgen.training.train_ddpm",
            "ldm": "hfgen.training.train_ldm", "autoencoder": "hfgen.training.train_autoencoder"}


def check_image_output(name: str, path: str) -> None:
    """An image file that can be written: a known image extension in an existing, writable folder."""
    import PIL.Image

    extension = os.path.splitext(path)[1].lower()
    if extension not in PIL.Image.registered_extensions():
        raise ValueError(f"`{name}` {path!r} must be an image file name (.png, .jpg, ...), got the extension "
                         f"{extension or 'none'!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"`{name}` {path!r} cannot be written: {folder!r} is not a writable folder")


# `hfgen sample`'s flags that are arguments of the pipeline's call
SAMPLING_FLAGS = ("class_labels", "prompt", "negative_prompt", "guidance_scale", "num_inference_steps")


def check_sampling_flags(args, pipeline) -> None:
    """Refuses a sampling flag that the loaded pipeline's call does not take (or `--class_labels` for an
    unconditional model), naming the flag and the pipeline's class, and the flags it does take. (A pipeline that
    takes an argument checks its value itself.)"""
    from hfgen.pipelines.pipeline_utils import call_arguments

    accepted = call_arguments(pipeline)
    if not getattr(pipeline, "num_classes", 0):
        accepted.discard("class_labels")
    for name in SAMPLING_FLAGS:
        if getattr(args, name) is not None and name not in accepted:
            takes = ", ".join(f"--{flag}" for flag in SAMPLING_FLAGS if flag in accepted) or "none of them"
            raise ValueError(f"`--{name}` does not apply to {args.pretrained!r}, a {type(pipeline).__name__}: of "
                             f"{', '.join('--' + flag for flag in SAMPLING_FLAGS)} it takes {takes}")


def sample(argv) -> str:
    parser = CommandParser(prog="hfgen sample", description="Sample a grid of images from a pipeline.")
    parser.add_argument("pretrained", help="A pipeline folder or a Hub repo id.")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--class_labels", nargs="+", default=None,
                        help="Labels (ids or names) for conditional models, one per image or one for all.")
    parser.add_argument("--prompt", nargs="+", default=None,
                        help="Text-to-image pipelines: one prompt for all images, or one per image.")
    parser.add_argument("--negative_prompt", default=None, help="With --guidance_scale: contrasted with the prompt.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Classifier-free guidance weight.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Denoising steps of a diffusion pipeline.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="samples.png", help="PNG file for the grid.")
    args = parser.parse_args(argv)
    check_image_output("--output", args.output)
    if args.num_images < 1:
        raise ValueError(f"`--num_images` must be a positive integer, got {args.num_images}")

    import torch

    from hfgen import AutoPipeline
    from hfgen.image_processing import image_grid
    from hfgen.utils import check_device

    check_device("--device", args.device)
    pipeline = AutoPipeline.from_pretrained(args.pretrained)
    check_sampling_flags(args, pipeline)
    pipeline = pipeline.to(args.device)
    labels = args.class_labels
    if labels is not None:
        labels = [int(label) if label.isdigit() else label for label in labels]
        labels = labels * args.num_images if len(labels) == 1 else labels
    generator = torch.Generator(args.device).manual_seed(args.seed)
    options = {name: getattr(args, name) for name in ("guidance_scale", "num_inference_steps", "negative_prompt")
               if getattr(args, name) is not None}
    if args.prompt is not None:  # a pipeline without a text encoder refuses `prompt` with a clear error
        options["prompt"] = args.prompt * args.num_images if len(args.prompt) == 1 else args.prompt
    images = pipeline(args.num_images, class_labels=labels, generator=generator, **options).images
    image_grid(images).save(args.output)
    print(f"wrote {len(images)} samples to {args.output}")
    return args.output


def evaluate(argv) -> dict[str, float]:
    parser = CommandParser(
        prog="hfgen evaluate",
        description="Fréchet distance between a pipeline's samples and a dataset split (with --sample_metrics also "
                    "KID, precision/recall, density/coverage, class accuracy and a memorisation check), plus the "
                    "likelihood bound of a VAE or a diffusion model; prints the metrics as JSON.")
    parser.add_argument("pretrained", help="A pipeline folder or a Hub repo id.")
    parser.add_argument("--dataset_name", default="hfgen:mnist", help="hfgen:mnist, hfgen:digits or a Hub dataset.")
    parser.add_argument("--train_data_dir", default=None, help="A local image folder, used instead of --dataset_name.")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--num_samples", type=int, default=1000, help="Samples drawn, and real images compared with.")
    parser.add_argument("--feature_extractor", default="auto",
                        help='Features of the Fréchet distance: "auto" (the digit classifier for 1-channel images of at '
                             'least 28 px, "inception" for RGB when torch-fidelity is installed), "none" (no FD), '
                             '"hfgen:digit-classifier" (trained and cached on first use), a saved DigitClassifier '
                             'folder, "inception" (FID; pip install "hfgen[fid]"), "dinov2:<Hub id or folder>" (e.g. '
                             'dinov2:facebook/dinov2-small; FD_DINOv2 as Stein et al. 2023 recommend) or '
                             '"clip:<Hub id or folder>" (e.g. clip:openai/clip-vit-base-patch32).')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--num_importance_samples", type=int, default=100, help="K of a VAE's IWAE bound.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Denoising steps of a diffusion pipeline.")
    parser.add_argument("--vlb_num_images", type=int, default=100, help="Images of a diffusion model's bound.")
    parser.add_argument("--vlb_num_timesteps", type=int, default=None, help="Sampled terms of that bound (all: None).")
    parser.add_argument("--sample_metrics", action="store_true",
                        help="Also KID, precision, recall, density and coverage in the FD's features, and a "
                             "conditional model's class accuracy under the digit classifier.")
    parser.add_argument("--nearest_k", type=int, default=3, help="k of precision, recall, density and coverage.")
    parser.add_argument("--memorisation", action="store_true",
                        help="With --sample_metrics on the test split: the share of samples closer to the training "
                             "images than test images are (reads the whole train split).")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="Text-to-image: guidance of the prompt-following samples (default 3 for a model trained "
                             "with prompt dropout, else 1).")
    parser.add_argument("--prompts_per_digit", type=int, default=20,
                        help="Text-to-image on hfgen's captioned digits: images per digit of each prompt set.")
    parser.add_argument("--caption_column", default=None,
                        help="Text-to-image: the dataset's caption column, for --clip_model (the bundled digits: "
                             "hfgen's captions, always).")
    parser.add_argument("--clip_model", default=None,
                        help="Text-to-image: CLIP score of samples of the dataset's captions with this CLIP model (Hub "
                             "id or folder, e.g. openai/clip-vit-base-patch32).")
    parser.add_argument("--num_clip_images", type=int, default=100, help="Images of the CLIP score.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write_card", action="store_true",
                        help="Merge the metrics into the folder's README.md model card and metrics.json.")
    args = parser.parse_args(argv)
    if args.write_card and not os.path.isdir(args.pretrained):
        raise ValueError(f"`--write_card` needs a local pipeline folder, got {args.pretrained!r}")
    if args.sample_metrics and args.feature_extractor == "none":
        raise ValueError("`--sample_metrics` is computed in the FD's features: it needs a --feature_extractor, "
                         "not none")
    if args.memorisation and not (args.sample_metrics and args.split == "test"):
        raise ValueError("`--memorisation` compares samples with the train split through the test split: it needs "
                         f"--sample_metrics and --split test, got --split {args.split}"
                         f"{'' if args.sample_metrics else ' without --sample_metrics'}")

    from hfgen import AutoPipeline
    from hfgen.data import load_image_dataset
    from hfgen.evaluation import EvaluationConfig, evaluate, feature_space
    from hfgen.hub_utils import update_model_card_metrics
    from hfgen.sample_metrics import MEMORISATION_QUANTILE
    from hfgen.utils import check_device

    check_device("--device", args.device)
    pipeline = AutoPipeline.from_pretrained(args.pretrained).to(args.device)
    text_to_image = hasattr(pipeline, "encode_prompt")
    bundled = args.train_data_dir is None and args.dataset_name.startswith("hfgen:")
    if not text_to_image:
        given = [flag for flag in ("guidance_scale", "caption_column", "clip_model") if getattr(args, flag)]
        if given:
            raise ValueError(f"`--{given[0]}` measures how a text-to-image pipeline follows prompts; "
                             f"{args.pretrained!r} holds a {type(pipeline).__name__}")
    caption_column = ("text" if bundled else args.caption_column) if text_to_image else None
    dataset = load_image_dataset(args.dataset_name, args.split, pipeline.sample_size, args.train_data_dir,
                                 caption_column=caption_column)
    # the dataset is loaded at the pipeline's size, so its image shape is that of the samples
    feature_extractor = feature_space(args.feature_extractor, dataset.image_shape)
    if feature_extractor is not None:
        feature_extractor = feature_extractor.to(args.device)
    config = EvaluationConfig(
        num_samples=args.num_samples, feature_extractor=feature_extractor or "none", seed=args.seed,
        batch_size=args.batch_size, sample_metrics=args.sample_metrics, nearest_k=args.nearest_k,
        memorisation=args.memorisation, num_importance_samples=args.num_importance_samples,
        pipeline_kwargs={} if args.num_inference_steps is None else {"num_inference_steps": args.num_inference_steps},
        vlb_num_images=args.vlb_num_images, vlb_num_timesteps=args.vlb_num_timesteps,
        digit_prompts=text_to_image and bundled, prompts_per_digit=args.prompts_per_digit,
        guidance_scale=args.guidance_scale, clip_model=args.clip_model, num_clip_images=args.num_clip_images)
    train_dataset = None
    if config.reads_train_dataset(feature_extractor):
        train_dataset = load_image_dataset(args.dataset_name, "train", pipeline.sample_size, args.train_data_dir)
    metrics = evaluate(pipeline, dataset, config, train_dataset)
    print(json.dumps(metrics, indent=2))
    if args.write_card:
        dataset_name = args.train_data_dir or args.dataset_name
        fd_args = {"feature_extractor": getattr(feature_extractor, "name_or_path", "none"), "num_samples": args.num_samples, "seed": args.seed}
        metric_args = {"fd": fd_args, "kid": fd_args, "kid_std": fd_args, "class_accuracy": fd_args,
                       "memorisation": {**fd_args, "quantile": MEMORISATION_QUANTILE, "train_split": "train"},
                       **dict.fromkeys(("precision", "recall", "density", "coverage"),
                                       {**fd_args, "nearest_k": args.nearest_k})}
        update_model_card_metrics(args.pretrained, metrics, dataset_name=dataset_name, split=args.split,
                                  metric_args={name: value for name, value in metric_args.items() if name in metrics})
        print(f"wrote the metrics into {os.path.join(args.pretrained, 'README.md')} and metrics.json", file=sys.stderr)
    return metrics


def demo(argv) -> str | None:
    parser = CommandParser(prog="hfgen demo", description='A Gradio app for a pipeline folder or Hub id, or (with '
                           '--write_space) the Space that runs it. Needs gradio: pip install "hfgen[demo]".')
    parser.add_argument("pretrained", help="A pipeline folder or a Hub repo id.")
    parser.add_argument("--port", type=int, default=None, help="Server port (default: the first free from 7860).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0: every interface).")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write_space", default=None, metavar="DIR",
                        help="Write a Gradio Space (app.py, requirements.txt, README.md) into DIR instead of serving.")
    parser.add_argument("--hub_model_id", default=None,
                        help="With --write_space: the Hub repo the Space loads the model from (default: the Hub id "
                             "given as the pipeline).")
    args = parser.parse_args(argv)
    if args.hub_model_id and not args.write_space:
        raise ValueError("`--hub_model_id` names the model repo of a Space: it needs `--write_space DIR`")

    from hfgen.hub_utils import check_repo_id
    from hfgen.utils import check_device

    check_device("--device", args.device)
    if args.hub_model_id:
        check_repo_id("--hub_model_id", args.hub_model_id)
    from hfgen import demo as demo_app  # an ImportError here says how to install gradio

    if args.write_space:
        folder = demo_app.write_space(args.pretrained, args.write_space, args.hub_model_id)
        print(f"wrote the Space into {folder}; run it with `python {os.path.join(folder, 'app.py')}`")
        return folder
    demo_app.build_demo(args.pretrained, args.device).launch(server_name=args.host, server_port=args.port,
                                                            share=args.share)
    return None


def push(argv) -> str:
    parser = CommandParser(prog="hfgen push", description="Push a finished pipeline folder to the Hub as it is, with its "
                           "model card and code (checkpoints, logs and the first stage's training folder stay local).")
    parser.add_argument("folder", help="A saved pipeline folder (a training run's --output_dir).")
    parser.add_argument("repo_id", help="The Hub repo, user/name; created when it does not exist.")
    parser.add_argument("--token", default=None, help="A Hub token (default: HF_TOKEN or the one `hf auth login` saved).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--license", default=None, help="Set the card's license (apache-2.0, mit, ...) before pushing.")
    args = parser.parse_args(argv)

    from hfgen.hub_utils import check_license, check_repo_id, push_output_folder, push_token, set_card_license
    from hfgen.pipelines.pipeline_utils import resolve_pretrained_path
    from hfgen.remote_code import has_saved_code, write_remote_code

    check_repo_id("repo_id", args.repo_id)
    check_license("--license", args.license)
    if not os.path.isdir(args.folder):
        raise ValueError(f"`folder` {args.folder!r} is not a folder: pass a saved pipeline folder")
    resolve_pretrained_path(args.folder)  # a complete pipeline folder, checked
    push_token(args.token)  # refused before any work without a token
    if not has_saved_code(args.folder):  # saved by hfgen before 0.2: add the code that plain diffusers loads
        from hfgen import AutoPipeline

        write_remote_code(AutoPipeline.from_pretrained(args.folder), args.folder)
        print(f"wrote the pipeline's code into {args.folder} (saved by an older hfgen)", file=sys.stderr)
    if args.license:
        set_card_license(args.folder, args.license)
    url = push_output_folder(args.folder, args.repo_id, token=args.token, private=args.private or None)
    print(url)
    return url


# Errors of the user's input (hfgen's checks raise these, naming the argument): one line, exit status 2.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)
DEBUG_FLAG, DEBUG_ENV = "--debug", "HFGEN_DEBUG"


def one_line(error: BaseException) -> str:
    """The message of `error` on one line. An error re-raised from a DataLoader worker carries the worker's
    traceback in its message: its last line is the original error."""
    message = str(error).strip() or type(error).__name__
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split())


def run_command(command, argv=None, prog: str = "hfgen"):
    """Runs `command(argv)` as a command line does: an error of the user's input prints `prog: error: ...` on one
    line and exits with status 2, without a traceback unless --debug or HFGEN_DEBUG=1 asks for one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        return command(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def main(argv=None) -> None:
    """The `hfgen` command."""
    run_command(dispatch, argv)


def dispatch(argv) -> None:
    usage = (f"usage: hfgen train {{{','.join(TRAINERS)}}} ARGS | hfgen sample FOLDER ARGS | hfgen evaluate FOLDER ARGS | "
             "hfgen demo FOLDER ARGS | hfgen distill TEACHER ARGS | hfgen push FOLDER REPO_ID | hfgen --version  (-h after "
             "each for its flags)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    if argv[0] == "--version":
        from hfgen import __version__

        print(f"hfgen {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        if not rest or rest[0] not in TRAINERS:
            raise ValueError(f"`hfgen train` needs a family, one of {sorted(TRAINERS)}; got {rest[:1]}")
        importlib.import_module(TRAINERS[rest[0]]).main(rest[1:])
    elif command == "sample":
        sample(rest)
    elif command == "evaluate":
        evaluate(rest)
    elif command == "demo":
        demo(rest)
    elif command == "push":
        push(rest)
    elif command == "distill":  # `hfgen distill TEACHER ARGS` is train_distill's `--teacher TEACHER ARGS`
        if not rest or rest[0].startswith("-"):
            raise ValueError("`hfgen distill` needs the teacher first: hfgen distill TEACHER_FOLDER_OR_REPO --output_dir "
                             "DIR [--num_steps 1|2|4 ...]")
        importlib.import_module("hfgen.training.train_distill").main(["--teacher", rest[0], *rest[1:]])
    else:
        raise ValueError(f"unknown command {command!r}; {usage}")


if __name__ == "__main__":
    main()
