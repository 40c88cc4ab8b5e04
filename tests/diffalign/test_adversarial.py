"""OGDM's adversarial pieces (diffalign/adversarial.py, diffalign/ddim.py's projection): the losses against
hand-computed values, the projection against the forward process in closed form, and a discriminator that reads
its conditioning."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffalign.adversarial import Discriminator, discriminator_hinge, generator_loss, r1_penalty
from diffalign.ddim import add_noise, noise_of, project, x0_and_eps


def test_hinge_and_logistic_losses_match_hand_computed_values():
    real = torch.tensor([0.5, 2.0])
    fake = torch.tensor([-0.5, 0.3])
    # D: relu(1 - 0.5) = 0.5, relu(1 - 2) = 0 -> 0.25;  relu(1 - 0.5) = 0.5, relu(1 + 0.3) = 1.3 -> 0.9
    assert float(discriminator_hinge(real, fake)) == pytest.approx(0.25 + 0.9)
    assert float(generator_loss(fake, "hinge")) == pytest.approx(0.1)  # -(-0.5 + 0.3) / 2
    expected = (math.log1p(math.exp(0.5)) + math.log1p(math.exp(-0.3))) / 2  # softplus(-D)
    assert float(generator_loss(fake, "logistic")) == pytest.approx(expected)
    with pytest.raises(ValueError, match="accepted: hinge, logistic"):
        generator_loss(fake, "wasserstein")


def test_r1_penalty_is_the_squared_input_gradient():
    # D(x) = <w, x> + 0.5 ||x||^2: grad_x D = w + x, so the penalty is the batch mean of ||w + x||^2
    w = torch.tensor([1.0, -2.0, 0.5])
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, -1.0]], requires_grad=True)
    logits = (x * w).sum(1) + 0.5 * x.pow(2).sum(1)
    pen = r1_penalty(logits, x)
    by_hand = ((torch.tensor([[1.0, -1.0, 2.5], [2.0, -1.0, -0.5]])) ** 2).sum(1).mean()
    assert float(pen.detach()) == pytest.approx(float(by_hand))  # (1 + 1 + 6.25 + 4 + 1 + 0.25) / 2 = 6.75
    assert pen.requires_grad  # kept in the graph: the penalty trains D


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_real_projection_is_the_forward_process_with_the_same_noise(prediction_type):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([999, 700, 500, 200, 50, 3])
    s = torch.tensor([199, 0, 100, 200, 50, 1])
    x_t = add_noise(sched, x0, t, eps)
    # the real sample: the DDIM jump from x_t with the true x_0 (its noise recovered from x_t) ...
    real = project(sched, x0, noise_of(sched, x_t, x0, t), t - s)
    # ... is q(x_{t-s} | x_0) with the same noise, in closed form
    a = sched.alphas_cumprod.double()[t - s].view(-1, 1, 1, 1)
    closed = (a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()).float()
    torch.testing.assert_close(real, closed, atol=2e-5, rtol=0)
    torch.testing.assert_close(real, add_noise(sched, x0, t - s, eps), atol=2e-5, rtol=0)
    # a model that predicts its target exactly projects onto the same point (the fake equals the real)
    target = eps if prediction_type == "epsilon" else (
        sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * eps - (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        * x0)
    x0_hat, eps_hat = x0_and_eps(sched, target, t, x_t)
    torch.testing.assert_close(project(sched, x0_hat, eps_hat, t - s), closed, atol=2e-3, rtol=0)
    # s = 0 is the identity
    assert torch.allclose(project(sched, x0, eps, t), x_t, atol=1e-6)


def test_discriminator_reads_the_noise_levels_and_the_caption_on_pixels_and_latents():
    torch.manual_seed(0)
    for channels, size in ((3, 32), (4, 64)):
        d = Discriminator(in_channels=channels, channels=8, blocks=3, text_dim=16)
        x = torch.randn(4, channels, size, size)
        t, t_to, text = torch.tensor([900, 500, 300, 10]), torch.tensor([800, 500, 100, 0]), torch.randn(4, 16)
        out = d(x, t, t_to, text)
        assert out.shape == (4,) and torch.isfinite(out).all()
        assert not torch.allclose(out, d(x, t, t_to - 50 * (t_to > 50), text))  # the target level
        assert not torch.allclose(out, d(x, torch.flip(t, [0]), t_to.clamp(max=0), text))  # the source level
        assert not torch.allclose(out, d(x, t, t_to, torch.randn(4, 16)))  # the caption
