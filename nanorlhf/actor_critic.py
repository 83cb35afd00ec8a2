"""PPO's networks: the policy, its critic and the one forward a training step makes (train_ppo.py).

Rows are left-padded prompts (P columns) followed by right-padded responses (L columns): response token j
sits in column P+j and is predicted by column P+j-1, so slicing gives (B, L) tensors aligned with the
response. Both the sampler's π_old and the update's π come from this one forward (N+: ratio = 1 exactly).
"""

import copy

import torch
from torch import Tensor, nn

from nanorlhf.sampling import left_pad


class Critic(nn.Module):
    """V(s_t) on every position: a backbone (a copy of the policy's, N+) and a scalar head."""

    def __init__(self, backbone: nn.Module | None, hidden_size: int):
        super().__init__()
        self.model = copy.deepcopy(backbone) if backbone is not None else None  # None: shared with the policy
        p = next(self.model.parameters()) if self.model is not None else None
        self.head = nn.Linear(hidden_size, 1, bias=True, device=p.device if p is not None else None)
        nn.init.zeros_(self.head.weight)  # V = 0 at first: no random values in the first advantages
        nn.init.zeros_(self.head.bias)


class ActorCritic(nn.Module):
    """The policy, its critic (or none: grpo/rloo) and the one forward a training step makes (DDP hooks it):
    -> log π(a_t|s_t) at the sampling temperature (B, L), V(s_t) (B, L) or None, the logits (B, L, V)."""

    def __init__(self, policy: nn.Module, critic: Critic | None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, ids: Tensor, attn: Tensor, P: int, temperature: float):
        hidden = self.policy.model(ids, attn)  # (B, P+L, H)
        logp, logits = token_logps(self.policy, hidden, ids, P, temperature)
        if self.critic is None:
            return logp, None, logits
        # shared: the head reads the policy's features, detached, so the value loss trains the head alone and
        # cannot pull the policy where the reward does not (the interference N+ avoids with a separate critic)
        h = hidden.detach() if self.critic.model is None else self.critic.model(ids, attn)
        return logp, self.critic.head(h[:, P - 1:-1]).squeeze(-1).float(), logits  # (B, L)


def token_logps(lm, hidden: Tensor, ids: Tensor, P: int, temperature: float) -> tuple[Tensor, Tensor]:
    """hidden (B, P+L, H) -> log-probs (B, L) of the response tokens ids[:, P:] and the logits (B, L, V), fp32,
    divided by the temperature the sampler used (N+: otherwise π_old is not the sampling policy)."""
    logits = lm.lm_head(hidden[:, P - 1:-1]).float() / temperature
    return logits.log_softmax(-1).gather(-1, ids[:, P:, None]).squeeze(-1), logits


def ref_logps(ref, ids: Tensor, attn: Tensor, P: int, temperature: float) -> Tensor:
    """The frozen reference's log-probs (B, L): the same arithmetic as ActorCritic's policy path."""
    return token_logps(ref, ref.model(ids, attn), ids, P, temperature)[0]


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded prompts + right-padded responses -> ids, attn (B, P+L), mask (B, L) on response tokens."""
    prompt_ids, prompt_attn = left_pad(prompts, pad_id)
    L = max(map(len, responses))
    resp = torch.full((len(responses), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), L), dtype=torch.long)
    for i, r in enumerate(responses):
        resp[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return {"ids": torch.cat([prompt_ids, resp], 1), "attn": torch.cat([prompt_attn, mask], 1), "mask": mask,
            "P": prompt_ids.shape[1]}
