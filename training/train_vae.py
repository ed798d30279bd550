"""Trains a VAE or conditional VAE with the (beta-)ELBO (docs/maths.md §2.4, §5.1).

    accelerate launch -m hfgen.training.train_vae --output_dir hfgen-vae-mnist
    hfgen train vae --output_dir hfgen-cvae-mnist --conditional
"""

from hfgen.models import VAEModel
from hfgen.models.vae import ARCHITECTURES, KL_ESTIMATORS, LIKELIHOODS
from hfgen.pipelines import ConditionalPipeline, VAEPipeline

from hfgen.utils import check_non_negative_int, check_non_negative_number, check_positive_int, check_positive_number

from .trainer import Trainer, training_parser


def parse_args(argv=None):
    parser = training_parser("Train a VAE (or a conditional VAE) on images in [0, 1].")
    add = parser.add_argument
    add("--architecture", default="mlp", choices=ARCHITECTURES)
    add("--hidden_dims", type=int, nargs="+", default=[400], help="Encoder widths (mlp) or channels (conv).")
    add("--latent_dim", type=int, default=20)
    add("--latent_channels", type=int, default=0,
        help="conv: a spatial latent of this many channels at 1 / 2 ** len(hidden_dims) of the image size "
             "(latent diffusion's first stage); 0: a vector of --latent_dim.")
    add("--likelihood", default="bernoulli", choices=LIKELIHOODS)
    add("--decoder_std", type=float, default=0.1, help="Gaussian decoder std (fixed, or initial if learned).")
    add("--learn_decoder_std", action="store_true")
    add("--beta", type=float, default=1.0, help="Weight of the KL term (1: the ELBO).")
    add("--kl_estimator", default="analytic", choices=KL_ESTIMATORS)
    add("--num_latent_samples", type=int, default=1, help="Reparameterized samples K per example.")
    add("--eval_importance_samples", type=int, default=100, help="K of the IWAE bound on the test split.")
    return parser.parse_args(argv)


class VAETrainer(Trainer):
    family = "vae"
    ema_model_names = ("vae",)
    flag_checks = {**dict.fromkeys(("latent_dim", "num_latent_samples", "eval_importance_samples"), check_positive_int),
                   "latent_channels": check_non_negative_int, "beta": check_non_negative_number,
                   "decoder_std": check_positive_number}

    def build_models(self):
        args, data = self.args, self.train_dataset
        channels, size, _ = data.image_shape
        vae = VAEModel(
            sample_size=size,
            in_channels=channels,
            latent_dim=args.latent_dim,
            architecture=args.architecture,
            hidden_dims=args.hidden_dims,
            likelihood=args.likelihood,
            decoder_std=args.decoder_std,
            learn_decoder_std=args.learn_decoder_std,
            num_classes=self.num_classes,
            id2label=self.id2label,
            latent_channels=args.latent_channels,
        )
        return {"vae": vae}

    def training_step(self, images, labels):
        args = self.args
        output = self.models["vae"](
            images, labels, num_samples=args.num_latent_samples,
            kl_estimator=args.kl_estimator,
        )
        # beta-ELBO: maximise E_q[log p(x|z)] - beta KL(q(z|x) || p(z)), averaged over the batch
        loss = -(output.log_likelihood - args.beta * output.kl).mean()
        self.optimize("vae", loss)
        return {"loss": loss.detach(), "kl": output.kl.mean().detach()}

    def build_pipeline(self):
        vae = self.sampling_model("vae")
        return ConditionalPipeline(vae) if self.args.conditional else VAEPipeline(vae)

    def evaluation_options(self):
        return {"num_importance_samples": self.args.eval_importance_samples}

    def model_card_description(self):
        kind = "conditional VAE" if self.args.conditional else "VAE"
        return (f"A {kind} trained with hfgen on `{self.args.dataset_name}`. The negative ELBO and the "
                f"importance-weighted NLL bound (K = {self.args.eval_importance_samples}) are in nats per image.")


def main(argv=None) -> str:
    return VAETrainer(parse_args(argv)).train()


if __name__ == "__main__":
    from hfgen.cli import run_command

    run_command(main, prog="hfgen train")
