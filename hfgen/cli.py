"""The `hfgen` command: `hfgen train <family> ...` and `hfgen sample <folder> ...`.

`hfgen train vae ARGS` runs exactly what `accelerate launch -m hfgen.training.train_vae ARGS` runs.
"""

import argparse
import importlib
import sys

TRAINERS = {"vae": "hfgen.training.train_vae", "gan": "hfgen.training.train_gan"}


def sample(argv) -> str:
    parser = argparse.ArgumentParser(prog="hfgen sample", description="Sample a grid of images from a pipeline.")
    parser.add_argument("pretrained", help="A pipeline folder or a Hub repo id.")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--class_labels", nargs="+", default=None,
                        help="Labels (ids or names) for conditional models, one per image or one for all.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="samples.png", help="PNG file for the grid.")
    args = parser.parse_args(argv)

    import torch

    from hfgen import AutoPipeline
    from hfgen.image_processing import image_grid

    pipeline = AutoPipeline.from_pretrained(args.pretrained).to(args.device)
    labels = args.class_labels
    if labels is not None:
        labels = [int(label) if label.isdigit() else label for label in labels]
        labels = labels * args.num_images if len(labels) == 1 else labels
    generator = torch.Generator(args.device).manual_seed(args.seed)
    images = pipeline(args.num_images, class_labels=labels, generator=generator).images
    image_grid(images).save(args.output)
    print(f"wrote {len(images)} samples to {args.output}")
    return args.output


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: hfgen train {{{','.join(TRAINERS)}}} ARGS | hfgen sample FOLDER ARGS  (-h after each for its flags)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        if not rest or rest[0] not in TRAINERS:
            raise SystemExit(f"hfgen train: name a family, one of {sorted(TRAINERS)}; got {rest[:1]}\n{usage}")
        importlib.import_module(TRAINERS[rest[0]]).main(rest[1:])
    elif command == "sample":
        sample(rest)
    else:
        raise SystemExit(f"hfgen: unknown command {command!r}\n{usage}")


if __name__ == "__main__":
    main()
