"""Modifiers written the way the original fidbench scripts wrote them (README "添加新压缩方法"):
the original ``Modifier`` base (here from fidbench.legacy: the only line a migrated file changes) holding
the model, a JSON config read by ``get_conf``, and ``compute_accuracy`` looping over the reference token by
token with the model's ``past_key_values``. fidbench's ``legacy`` method must run these unchanged."""

import torch

from fidbench.legacy import Modifier


class Origin(Modifier):
    def __init__(self, model, save_ckp=None, load_ckp=None, config=None):
        super().__init__(model, save_ckp, load_ckp)

    def ft_params(self):
        return []

    def reset(self):
        pass

    @torch.no_grad()
    def compute_accuracy(self, p_ids, g_ids):

        assert p_ids.shape[0] == 1, 'only support batch size 1'
        assert p_ids.ndim == 2 and g_ids.ndim == 2

        device = next(iter(self.model.parameters())).device
        p_ids, g_ids = p_ids.to(device), g_ids.to(device)

        output = self.model(input_ids=p_ids)
        kv_cache = output.past_key_values

        acc1, acc5 = 0, 0
        turns = g_ids.shape[-1] - 1

        for tok, label in zip(
                torch.chunk(g_ids[:, :-1], turns, dim=-1),
                torch.chunk(g_ids[:, 1:], turns, dim=-1)):

            output = self.model(input_ids=tok, past_key_values=kv_cache)
            logits, kv_cache = output.logits, output.past_key_values

            label = label.ravel().item()
            next_1 = logits.argmax(dim=-1).ravel().item()
            next_5 = logits.topk(k=5, dim=-1).indices.ravel().tolist()

            acc1 += next_1 == label
            acc5 += label in next_5

        acc1 /= turns
        acc5 /= turns

        return acc1, acc5


class Overcount(Origin):
    """Counts a top-5 hit more than once: acc@5 above 1, a bug a floor alone lets through."""

    def compute_accuracy(self, p_ids, g_ids):
        acc1, _ = super().compute_accuracy(p_ids, g_ids)
        return acc1, 1.5


class NoisyNorm(Origin):
    """Perturbs the final norm's weights in place by the config's ``noise`` (a change that must not leak)."""

    def __init__(self, model, save_ckp, load_ckp, config):
        self.get_conf(config)
        generator = torch.Generator().manual_seed(self.conf['seed'])
        weight = model.model.norm.weight.data
        weight += self.conf['noise'] * torch.randn(weight.shape, generator=generator)
        super().__init__(model, save_ckp, load_ckp)


class TrainedNorm(Modifier):
    """Uses every member of the original base class: ``get_conf`` / ``conf``, ``ft_params`` (the final norm's
    weight, as if trained) written by ``save_checkpoint`` and read back through ``load_ckp``, ``freeze_model`` /
    ``unfreeze_model``, ``reset``, ``forward`` (``self(...)``) in its loop, and ``generate``."""

    def __init__(self, model, save_ckp, load_ckp, config):
        self.get_conf(config)
        super().__init__(model, save_ckp, load_ckp)  # loads the checkpoint when load_ckp is given
        self.freeze_model()
        self.unfreeze_model()  # only ft_params train
        weight = self.ft_params()[0]
        generator = torch.Generator().manual_seed(self.conf['seed'])
        with torch.no_grad():  # on top of the checkpoint
            weight += self.conf['noise'] * torch.randn(weight.shape, generator=generator)
        self.calls = 0

    def ft_params(self):
        return [self.model.model.norm.weight]

    def reset(self):
        self.calls = 0

    @torch.no_grad()
    def compute_accuracy(self, p_ids, g_ids):
        self.reset()
        output = self(input_ids=p_ids)
        kv_cache = output.past_key_values
        acc1, acc5 = 0, 0
        turns = g_ids.shape[-1] - 1
        for t in range(turns):
            output = self(input_ids=g_ids[:, t:t + 1], past_key_values=kv_cache)
            kv_cache = output.past_key_values
            self.calls += 1
            label = g_ids[0, t + 1].item()
            acc1 += output.logits[0, -1].argmax().item() == label
            acc5 += label in output.logits[0, -1].topk(5).indices.tolist()
        assert self.calls == turns
        return acc1 / turns, acc5 / turns
