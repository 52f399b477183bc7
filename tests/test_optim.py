import torch

from nanoseek.optim import AdamWLowPrecisionStates


def test_bf16_state_adamw_tracks_torch_adamw_and_halves_state_memory():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    target = torch.randn(64, 32)
    ref_p, ours_p, ours32_p = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([ref_p], **kw)
    ours = AdamWLowPrecisionStates([ours_p], state_dtype=torch.bfloat16, **kw)
    ours32 = AdamWLowPrecisionStates([ours32_p], state_dtype=torch.float32, **kw)
    for _ in range(50):
        for p, opt in ((ref_p, ref), (ours_p, ours), (ours32_p, ours32)):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(ours32_p, ref_p, atol=1e-6)  # same algorithm as torch's AdamW
    assert (ours_p - ref_p).abs().max() < 2e-2 * ref_p.abs().max()  # bf16 moments: close, not equal
    assert not torch.equal(ours_p, ref_p)
    assert ours.state[ours_p]["exp_avg"].dtype == torch.bfloat16
    assert ours.state_bytes() * 2 == ours32.state_bytes()
