"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T
divides the logits, fitted on the validation split by minimising the NLL with LBFGS. It never
changes a prediction (argmax is unchanged), only how confident the probabilities are.

`--calibrate` fits it after training (loop.py) and stores it in best.pt as "temperature"; every
user of a checkpoint (evaluate, predict, serve, export) divides the logits by it."""
import torch
from torch.nn import functional as F

from ..data.stream import make_loader
from .engine import depends_on_batch


class Tempered(torch.nn.Module):
    """`net` whose logits are divided by `temperature` (a buffer, so ONNX export bakes it in)."""

    def __init__(self, net, temperature):
        super().__init__()
        self.net = net
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x):
        return self.net(x) / self.temperature


def tempered(net, temperature):
    """`net` itself when the temperature is 1 (no checkpoint key, or none fitted)."""
    return net if temperature in (None, 1, 1.0) else Tempered(net, temperature)


def fit_temperature(logits, labels, steps=50):
    """The T > 0 minimising mean NLL(softmax(logits / T), labels). Fitted as log T, so T stays
    positive without a constraint; LBFGS converges in a few iterations on this 1-D convex-ish problem."""
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # tight tolerances: the defaults stopped ~2e-6 above the minimum NLL on sharp logits (T ~ 0.3)
    opt = torch.optim.LBFGS([log_t], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    opt.step(closure)
    return float(log_t.detach().exp())


@torch.no_grad()   # not inference_mode: the logits feed fit_temperature's autograd
def split_logits(net, split, preprocess, device, batch_size=256, streamed=False):
    """(N, K) float logits and (N,) labels of a whole split (uint8 images, labels), in order;
    `streamed`: the split is memory-mapped from the disk cache and read batch by batch."""
    was_training = net.training
    net.eval()
    loader = make_loader(*split, batch_size, preprocess, device, streamed=streamed, mixed=depends_on_batch(net))
    logits, labels = zip(*[(net(xb).float().cpu(), yb.cpu()) for xb, yb in loader.batches()])
    net.train(was_training)
    return torch.cat(logits), torch.cat(labels)
