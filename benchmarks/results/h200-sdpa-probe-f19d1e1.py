"""Which SDPA backend serves packed decode attention on this GPU, and do strides change its bits?"""
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
g = torch.Generator("cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)
for w in (256, 1024):
    sk, sv = r(1, 8, 1152, 128), r(1, 8, 1152, 128)
    q = r(1, 8, 4, 128)
    valid = (torch.arange(w, device="cuda") <= w - 5).view(1, 1, 1, w)
    m = torch.where(valid, torch.zeros((), dtype=torch.bfloat16, device="cuda"), float("-inf"))
    k, v = sk[:, :, :w], sv[:, :, :w]
    base = F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous(), attn_mask=m)
    strided = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    bk = r(2, 8, 2048, 128); bk[0, :, :w] = k[0]; bv = r(2, 8, 2048, 128); bv[0, :, :w] = v[0]
    other = F.scaled_dot_product_attention(q, bk[:1, :, :w], bv[:1, :, :w], attn_mask=m)
    print(f"w={w} default: strided==contig {torch.equal(base, strided)} other-stride==contig {torch.equal(base, other)}")
    for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([b]):
                o = F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous(), attn_mask=m)
                o2 = F.scaled_dot_product_attention(q, bk[:1, :, :w], bv[:1, :, :w], attn_mask=m)
            print(f"  {b.name}: ==default {torch.equal(o, base)}; stride-invariant {torch.equal(o, o2)}")
        except Exception as e:
            print(f"  {b.name}: unavailable ({str(e).splitlines()[0][:80]})")
