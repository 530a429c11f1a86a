"""NSA's float64 form (`attnbench.variants.sparse.nsa`): the three branches computed densely
(`select_naive.dense_reference`), the selection from float64 compressed scores; what
`NSA.reference` checks the engine against."""

from __future__ import annotations

import torch

from attnbench.variants.sparse.select_naive import dense_reference

GATES = (1 / 3, 1 / 3, 1 / 3)  # compressed, selected, window


def nsa_selection(nsa, q, k, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, R, S) selection blocks of each query row in `rows` (default: all Nq), its own
    first (-1: empty slot), from float64 compressed scores; one selection per k/v group."""
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    z, g = b * hkv, h // hkv
    rows = torch.arange(nq, device=q.device) if rows is None else rows.to(q.device)
    r = len(rows)
    qpos = rows + (n - nq)
    qi = q[:, :, rows].reshape(b, hkv, g, r, d).transpose(2, 3).reshape(z, r, g, d)  # (Z,R,G,D)
    kz = k.reshape(z, n, d)  # (Z, N, D)
    with torch.no_grad():
        kc = nsa._compress(kz.detach()).double()
        _, p64 = nsa._compressed(qi.detach().double(), kc, kc, qpos)  # its output unused
        rest = nsa._select(p64, qpos, n)
        own = (qpos // nsa.sel_block)[None, :, None].expand(z, -1, 1)  # (Z, R, 1)
        sel = torch.cat([own, rest], -1).view(b, hkv, 1, r, -1)  # (B, Hkv, 1, R, S)
        return sel.expand(-1, -1, g, -1, -1).reshape(b, h, r, -1)  # (B, H, R, S)


def nsa_definition(nsa, q, k, v, dtype=torch.float64,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """The three branches of `nsa` (an `NSA`) densely in `dtype`, the selection from float64
    compressed scores, for the query rows `rows` (0..Nq−1; None: all): (B, H, R, D)."""
    b, h, nq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    idx = torch.arange(nq, device=q.device) if rows is None else rows.to(q.device)
    qpos = idx + (n - nq)  # the rows' positions
    q = q[:, :, idx]  # (B, H, R, D)
    r, z, g = len(idx), b * hkv, h // hkv
    qi = q.reshape(b, hkv, g, r, d).transpose(2, 3).reshape(z, r, g, d)  # (Z, R, G, D)
    kz, vz = k.reshape(z, n, d), v.reshape(z, n, d)  # (Z, N, D)
    with torch.no_grad():
        _, p64 = nsa._compressed(*(x.detach().double() for x in (qi, nsa._compress(kz),
                                                                 nsa._compress(vz))), qpos)
        rest = nsa._select(p64, qpos, n)
        own = (qpos // nsa.sel_block)[None, :, None].expand(z, -1, 1)  # (Z, R, 1)
        sel = torch.cat([own, rest], -1).view(b, hkv, r, -1)  # (B, Hkv, R, S): one per group
    kc, vc = (torch.cat([nsa._compress(x[i : i + 1].to(dtype)) for i in range(z)])
              for x in (kz, vz))  # (Z, C, D), one k/v head's cast at a time
    o_cmp, _ = nsa._compressed(qi.to(dtype), kc, vc, qpos)
    o_cmp = o_cmp.view(b, hkv, r, g, d).transpose(2, 3).reshape(b, h, r, d)  # (B, H, R, D)
    keys = torch.arange(n, device=q.device)
    blocks = keys // nsa.sel_block

    def selected(bi: int, j: int, r0: int, r1: int) -> torch.Tensor:
        chosen = (sel[bi, j, r0:r1, :, None] == blocks).any(1)  # (r, N), the group's
        return (chosen & (keys <= qpos[r0:r1, None]))[None]  # (1, r, N)

    def window(bi: int, j: int, r0: int, r1: int) -> torch.Tensor:
        rel = qpos[r0:r1, None] - keys
        return ((rel >= 0) & (rel <= nsa.window))[None]  # (1, r, N)

    o_sel = dense_reference(q, k, v, selected, dtype)
    o_win = dense_reference(q, k, v, window, dtype)
    g_cmp, g_slc, g_win = GATES
    return g_cmp * o_cmp + g_slc * o_sel + g_win * o_win
