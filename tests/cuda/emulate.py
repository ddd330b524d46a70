"""A CPU emulation of the CUDA extension (``csrc/``), for checking its math without a GPU.

``Emulator`` has the binding's functions (``forward``, ``backward``, ``device_info``) with the
same arguments, allocations and results, and computes them the way the kernels do:

* the launch plan from ``fused_rnn.ops.cuda.plan`` (the mirror of ``plan.h``, itself checked
  against the C++ by ``test_cuda_compile.py``) with a configurable SM count, so small H still
  spreads over several blocks with a ragged last block;
* per block, the W_hh slice exactly as ``load_w_forward``/``load_w_backward`` lay it out
  (gate-major rows forward, transposed columns backward, zero padding);
* per step and batch chunk, ``chunk_matmul``'s task decomposition (tiles x K-slices, one fp32
  slot each, NaN-poisoned so an unwritten slot read shows up) and ``gather``'s flat slot index;
* the epilogues of ``rnn_forward.cu``/``rnn_backward.cu`` (same index expressions, vectorised
  over the (n, j) loop), the double-buffered exchange, the carries and the lengths rules;
* checks of what the CUDA code assumes: WMMA/float4 pointer alignment, shared-memory bounds,
  and the grid-level protocol -- within a step each block writes only its own units of the
  exchange buffer, every real (b, u) is written exactly once, and nothing writes the buffer
  being read (which is what makes one grid.sync() per step enough).

It models the unstaged matmul (``plan.stage_k == 0``: the MMAs read X from global memory);
``max_stage_k`` is accepted and ignored. Staging changes only where X is read from and the
order of the K sums, which cudasim (``simulate.py``) checks by running the kernels themselves.
``prof`` (phase timing) is accepted and left as it is: there is no clock to read; so is
``stage_copy`` (how the stage is copied). ``k_parts`` (K parts, plan.h) is accepted and
ignored: the emulation models one block per unit slice over all of K (``parts = 1``); K parts
split that sum across blocks, which cudasim checks by running the kernels. So is
``max_blocks`` (the grid cap): the emulation spreads H over ``sms`` blocks, and a cap is only a
different block count, which the tests get by setting ``sms``; and ``cluster``,
``team_clusters`` and ``dsmem`` (clusters, and where the exchange lives): the emulation has no
barriers to swap and no memories to tell apart, so it runs the grid plan. ``tile_block`` (register
blocking of the matmul) is accepted and ignored: blocking keeps every tile's K order, so the
sums it models are the same; so is ``point_batch`` (the epilogue's batches of points: each
point's arithmetic is the same), and ``frag_loads`` (how the WMMA fragments are loaded: the same
instructions in another address space, the same values; under ``mma`` the TF32 tiles run as
mma.sync over a W slice swizzled within each row's 8 floats of a k-step, which its loads undo:
cudasim checks that path's bits against WMMA's).

It does not run the CUDA code: it checks the design and its index arithmetic, which the CUDA
code must then match line by line (the names here are the kernel's names).

Storage dtype float64 is allowed here (the kernels refuse it) so that the partition and the
formulas can be checked against the reference to 1e-10; ``math`` forces a tile shape.
"""

from __future__ import annotations

import torch

from fused_rnn.ops.cuda import plan as P

_CODES = {0: "LSTM", 1: "GRU", 2: "RNN_TANH", 3: "RNN_RELU"}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (torch.equal says a NaN differs from itself)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 mantissa bits), nearest (ties away), like __float_to_tf32."""
    if t.dtype != torch.float32:
        return t
    i = t.contiguous().view(torch.int32)
    i = (i + 0x1000) & ~0x1FFF
    return i.view(torch.float32)


class Emulator:
    def __init__(self, sms: int = 4, smem_optin: int = 227 * 1024, math: int | None = None):
        self.sms, self.smem_optin, self.math_override = sms, smem_optin, math
        self.launches: list[tuple[str, str, P.Plan]] = []  # (direction, mode, plan) per launch
        self.maths: list[int] = []  # the math (P.MATHS) of each launch, in the same order

    def device_info(self, index: int):
        return [self.sms, self.smem_optin, 9, 0, 1]

    # ------------------------------------------------------------------ helpers
    def _math(self, st: torch.dtype, allow_tf32: bool, cell: int, H: int, backward: bool) -> int:
        if self.math_override is not None:
            return self.math_override
        return P.choose_math(
            st in (torch.float16, torch.bfloat16), allow_tf32, cell, H, backward, self.sms,
            self.smem_optin,
        )

    def _plan(self, cell: int, math: int, H: int, backward: bool, B_pad: int,
              max_groups: int) -> P.Plan:
        groups = P.choose_groups(cell, math, H, backward, self.sms, self.smem_optin, B_pad,
                                 max_groups)
        assert (B_pad // P.K_BATCH_PAD) % groups == 0
        pl = P.make_plan(cell, math, H, backward, self.sms, groups)
        assert pl.smem_bytes <= self.smem_optin, "binding's checked_plan would refuse this"
        _wm, wn, wk, elem, _skew, _ = P.TILE_SHAPES[math]
        assert pl.w_bytes % 128 == 0
        if math != P.MATHS["fma"]:
            ldm = wk if P.k_blocked(math) else pl.ldw
            assert (ldm * elem) % 16 == 0, "WMMA ldm must be a multiple of 16 bytes"
        assert ((wn + P.K_SLOT_PAD) * 4) % 16 == 0
        assert pl.blocks <= self.sms, "cooperative grid larger than one block per SM"
        assert pl.blocks == pl.groups * pl.group_blocks
        assert (pl.group_blocks - 1) * pl.units < H <= pl.group_blocks * pl.units
        self.launches.append(("backward" if backward else "forward", _CODES[cell], pl))
        self.maths.append(math)
        return pl

    @staticmethod
    def _blocks(pl: P.Plan, H: int, B: int, B_pad: int):
        """(block, unit slice index, u0, units owned, chunks as (n0, ncols)) as the kernels
        derive them from blockIdx.x: group = b / group_blocks, slice = b % group_blocks."""
        rows = B_pad // pl.groups
        for blk in range(pl.blocks):
            q, ub = divmod(blk, pl.group_blocks)
            u0 = ub * pl.units
            n_begin, n_end = q * rows, min(q * rows + rows, B)
            assert n_begin < n_end, "a batch group without real rows"
            chunks = [(n0, min(P.K_CHUNK_COLS, n_begin + rows - n0))
                      for n0 in range(n_begin, n_end, P.K_CHUNK_COLS)]
            yield blk, ub, u0, min(pl.units, H - u0), chunks

    @staticmethod
    def _cd(st: torch.dtype) -> torch.dtype:
        return torch.float64 if st == torch.float64 else torch.float32

    # The W slice as the kernels hold it: a flat buffer of w_bytes in plan.h's layout
    # (row-major, or k-blocked for TF32), built from the logical m_rows x k slice `w_rows`.
    @staticmethod
    def _w_index(pl: P.Plan, math: int, r, k):
        wk = P.TILE_SHAPES[math][2]
        return (k // wk) * pl.ldw + r * wk + k % wk if P.k_blocked(math) else r * pl.ldw + k

    @classmethod
    def _w_flat(cls, w_rows, pl: P.Plan, math: int, cd) -> torch.Tensor:
        elem = P.TILE_SHAPES[math][3]
        flat = torch.zeros(pl.w_bytes // elem, dtype=cd)
        r = torch.arange(pl.m_rows)[:, None]
        k = torch.arange(w_rows.shape[1])[None, :]
        idx = cls._w_index(pl, math, r, k)
        assert int(idx.max()) < flat.numel(), "the W slice overflows w_bytes"
        flat[idx] = _tf32(w_rows) if math == P.MATHS["tf32"] else w_rows
        return flat

    # load_w_forward: local row r = g*units + j <-> W_hh row g*H + u0 + j.
    @classmethod
    def _load_w_forward(cls, w, pl: P.Plan, H: int, G: int, u0: int, math: int, cd):
        rows = torch.zeros(pl.m_rows, H, dtype=cd)
        for r in range(pl.m_rows):
            g, j = r // pl.units, r % pl.units
            if g < G and u0 + j < H:
                rows[r] = w[g * H + u0 + j, :H].to(cd)
        return cls._w_flat(rows, pl, math, cd)

    # load_w_backward: local row j <-> column u0 + j of W_hh, K = G*H.
    @classmethod
    def _load_w_backward(cls, w, pl: P.Plan, H: int, u0: int, math: int, cd):
        rows = torch.zeros(pl.m_rows, pl.k, dtype=cd)
        for j in range(pl.m_rows):
            if u0 + j < H:
                rows[j] = w[: pl.k, u0 + j].to(cd)
        return cls._w_flat(rows, pl, math, cd)

    @classmethod
    def _chunk_matmul(cls, sw, pl: P.Plan, x, n0: int, ncols: int, nreal: int, math: int, cd):
        """Returns (flat slots, nfr, ksplit) as chunk_matmul leaves them in shared memory.
        sw is the flat W buffer (_w_flat); a tile reads its wm rows through _w_index, so rows
        past m_pad come from wherever the layout puts them (TF32: the next k-block). Only the
        batch tiles holding the nreal real rows are multiplied."""
        wm, wn, wk, elem = P.TILE_SHAPES[math][:4]
        assert ncols % P.K_BATCH_PAD == 0 and n0 + ncols <= x.shape[0] and 0 < nreal <= ncols
        mfr, nfr = P.chunk_tiles(pl.m_pad, math, nreal)
        tiles = mfr * nfr
        ksteps = pl.k_pad // wk
        ksplit = min(P.K_WARPS // tiles, ksteps) if tiles < P.K_WARPS else 1
        assert tiles * ksplit <= pl.slots, "more tasks than scratch slots"
        sc = torch.full((pl.slots * pl.slot_floats,), float("nan"), dtype=cd)
        is_fma = math == P.MATHS["fma"]
        for task in range(tiles * ksplit):
            tile, ks = task // ksplit, task % ksplit
            mf, nf = tile // nfr, tile % nfr
            kb, ke = ks * ksteps // ksplit, (ks + 1) * ksteps // ksplit
            r0, c0 = mf * wm, n0 + nf * wn
            slot_off = pl.w_bytes + task * pl.slot_floats * 4
            if not is_fma:  # WMMA fragment origins must be 32-byte aligned
                for kk in range(kb, ke):
                    assert (cls._w_index(pl, math, r0, kk * wk) * elem) % 32 == 0
                    assert ((c0 * pl.k_pad + kk * wk) * elem) % 32 == 0
                assert slot_off % 32 == 0
            else:  # float4 loads of W rows and of x
                assert (pl.ldw * 4) % 16 == 0
                assert (cls._w_index(pl, math, r0, kb * wk) * 4) % 16 == 0
                assert (c0 * pl.k_pad * 4) % 16 == 0 and (kb * wk * 4) % 16 == 0
            r = torch.arange(r0, r0 + wm)[:, None]
            if is_fma:  # lanes past m_rows are guarded: they read nothing and contribute zeros
                r = r.clamp(max=pl.m_rows - 1)
            idx = cls._w_index(pl, math, r, torch.arange(kb * wk, ke * wk)[None, :])
            assert int(idx.max()) < sw.numel(), "read outside the W slice"
            rows = sw[idx]
            if is_fma:
                rows[max(0, pl.m_rows - r0):] = 0
            xt = x[c0 : c0 + wn, kb * wk : ke * wk].to(cd)
            if math == P.MATHS["tf32"]:
                xt = _tf32(xt)
            out = rows @ xt.T
            slot = sc[task * pl.slot_floats : (task + 1) * pl.slot_floats].view(wm, wn + P.K_SLOT_PAD)
            slot[:, :wn] = out
        return sc, nfr, ksplit

    @staticmethod
    def _gather(sc, pl: P.Plan, math: int, nfr: int, ksplit: int, m, n):
        """gather<M>() for index tensors m, n."""
        wm, wn = P.TILE_SHAPES[math][:2]
        assert m.numel() == 0 or int(m.max()) < pl.m_rows, "an output row the kernels discard"
        tile = (m // wm) * nfr + n // wn
        p = tile * ksplit * pl.slot_floats + (m % wm) * (wn + P.K_SLOT_PAD) + n % wn
        acc = torch.zeros(m.shape, dtype=sc.dtype)
        for s in range(ksplit):
            idx = p + s * pl.slot_floats
            assert idx.numel() == 0 or int(idx.max()) < pl.slots * pl.slot_floats
            acc = acc + sc[idx]
        return acc

    # ------------------------------------------------------------------ forward
    def forward(self, mode, xproj, h0, c0, w_hh, b_hh, lengths, reverse, allow_tf32, save,
                max_groups, max_stage_k=0, prof=None, stage_copy=2, k_parts=1, max_blocks=0,
                cluster=0, team_clusters=False, dsmem=False, tile_block=4,
                point_batch=0, b_ih=None, frag_loads=0):
        cell = int(mode)
        G = P.GATES[cell]
        T, B, GH = xproj.shape
        H = h0.shape[1]
        assert GH == G * H and T > 0 and B > 0
        st = h0.dtype
        cd = self._cd(st)
        math = self._math(st, allow_tf32, cell, H, False)
        B_pad = -(-B // P.K_BATCH_PAD) * P.K_BATCH_PAD
        pl = self._plan(cell, math, H, False, B_pad, max_groups)
        assert pl.k_pad % 16 == 0 and pl.k == H
        hbuf = torch.zeros(2, B_pad, pl.k_pad, dtype=st)
        hbuf[0, :B, :H] = h0
        cbuf = c0.to(cd).clone() if cell == 0 else None
        y = torch.full((T, B, H), float("nan"), dtype=st)
        has_aux = save and cell in (0, 1)
        aux = torch.full((T, B, H) if has_aux else (0,), float("nan"), dtype=cd)
        xp = xproj.to(cd).clone()  # the kernel updates xproj in place; emulate on a copy
        if b_ih is not None:  # the epilogue's x W_ih^T + b_ih: one fp32 sum, as here
            xp += b_ih.to(cd)
        xflat = xp.view(-1)
        yflat, auxflat = y.view(-1), aux.view(-1)
        bhh = None if b_hh is None else b_hh.to(cd)
        lens = None if lengths is None else lengths.long()
        sws = [self._load_w_forward(w_hh, pl, H, G, ub * pl.units, math, cd)
               for ub in range(pl.group_blocks)]

        for s in range(T):
            t = T - 1 - s if reverse else s
            hin, hout = hbuf[s & 1], hbuf[(s + 1) & 1]
            writer = torch.full((B_pad, pl.k_pad), -1, dtype=torch.long)
            hin_before = hin.clone()
            for blk, ub, u0, nu, chunks in self._blocks(pl, H, B, B_pad):
                assert nu > 0
                for n0, ncols in chunks:
                    nb = min(ncols, B - n0)
                    sc, nfr, ksplit = self._chunk_matmul(sws[ub], pl, hin, n0, ncols, nb, math,
                                                         cd)
                    idx = torch.arange(nb * pl.units)
                    j, n = idx % pl.units, idx // pl.units
                    keep = j < nu
                    j, n = j[keep], n[keep]
                    b, u = n0 + n, u0 + j
                    self._forward_point(
                        cell, G, H, T, B, t, b, n, j, u, pl, math, sc, nfr, ksplit, hin, hout,
                        xflat, yflat, auxflat, cbuf, bhh, lens, save, st, cd,
                    )
                    w = writer[b, u]
                    assert bool((w == -1).all()), "two writers of one exchange element"
                    writer[b, u] = blk
            # every real (b, u) written once, by the block owning (b's group, u); padding never
            owner = self._owner(pl, B, B_pad, torch.arange(H) // pl.units)
            assert bool((writer[:B, :H] == owner).all())
            assert bool((writer[B:, :] == -1).all()) and bool((writer[:, H:] == -1).all())
            assert _same_bits(hin, hin_before), "the buffer being read was written"
        h_n = hbuf[T % 2, :B, :H].clone()
        c_n = cbuf.to(st) if cell == 0 else torch.empty(0, dtype=st)
        if save:
            xproj.copy_(xp)
        return [y, h_n, c_n, aux]

    @staticmethod
    def _owner(pl: P.Plan, B: int, B_pad: int, unit_slice: torch.Tensor) -> torch.Tensor:
        """(B, n) block index owning batch row b and the unit slice of each column."""
        group = torch.arange(B) // (B_pad // pl.groups)
        return group[:, None] * pl.group_blocks + unit_slice[None, :]

    @staticmethod
    def _forward_point(cell, G, H, T, B, t, b, n, j, u, pl, math, sc, nfr, ksplit, hin, hout,
                       xflat, yflat, auxflat, cbuf, bhh, lens, save, st, cd):
        tbu = (t * B + b) * H + u
        xg = (t * B + b) * G * H + u
        hin_bu = hin[b, u].to(cd)
        if lens is not None:  # padding step: keep state, output zero
            pad = t >= lens[b]
            hout[b[pad], u[pad]] = hin[b[pad], u[pad]]
            yflat[tbu[pad]] = 0
            if cell == 0 and save:
                auxflat[tbu[pad]] = cbuf[b[pad], u[pad]]
            if cell == 1 and save:
                auxflat[tbu[pad]] = 0
            real = ~pad
            b, n, j, u, tbu, xg, hin_bu = b[real], n[real], j[real], u[real], tbu[real], xg[real], hin_bu[real]
        hh, pre = [], []
        for g in range(G):
            acc = Emulator._gather(sc, pl, math, nfr, ksplit, g * pl.units + j, n)
            hh.append(acc + (bhh[g * H + u] if bhh is not None else 0))
            pre.append(xflat[xg + g * H] + hh[g])
        if cell == 0:
            i, f, gg, o = torch.sigmoid(pre[0]), torch.sigmoid(pre[1]), torch.tanh(pre[2]), torch.sigmoid(pre[3])
            c = f * cbuf[b, u] + i * gg
            h = o * torch.tanh(c)
            cbuf[b, u] = c
            if save:
                for g, v in enumerate((i, f, gg, o)):
                    xflat[xg + g * H] = v
                auxflat[tbu] = c
        elif cell == 1:
            r, z = torch.sigmoid(pre[0]), torch.sigmoid(pre[1])
            nn = torch.tanh(xflat[xg + 2 * H] + r * hh[2])
            h = nn + z * (hin_bu - nn)
            if save:
                for g, v in enumerate((r, z, nn)):
                    xflat[xg + g * H] = v
                auxflat[tbu] = hh[2]
        else:
            h = torch.tanh(pre[0]) if cell == 2 else torch.relu(pre[0])
            if save:
                xflat[xg] = h
        hs = h.to(st)
        hout[b, u] = hs
        yflat[tbu] = hs

    # ------------------------------------------------------------------ backward
    def backward(self, mode, dy, dh_n, dc_n, w_hh, gates, aux, c0, hprev, lengths, reverse,
                 allow_tf32, max_groups, max_stage_k=0, prof=None, stage_copy=2, k_parts=1,
                 max_blocks=0, cluster=0, team_clusters=False, dsmem=False, tile_block=4,
                 point_batch=0, frag_loads=0):
        cell = int(mode)
        G = P.GATES[cell]
        T, B, H = dy.shape
        st = dy.dtype
        cd = self._cd(st)
        math = self._math(st, allow_tf32, cell, H, True)
        B_pad = -(-B // P.K_BATCH_PAD) * P.K_BATCH_PAD
        pl = self._plan(cell, math, H, True, B_pad, max_groups)
        assert pl.k == G * H
        dgbuf = torch.zeros(2, B_pad, pl.k_pad, dtype=st)
        dh_carry = dh_n.to(cd).clone()
        dc_carry = dc_n.to(cd).clone() if cell == 0 else None
        dgx = torch.full((T, B, G * H), float("nan"), dtype=st)  # stored rounded (from_float<T>)
        dghn = torch.full((T, B, H) if cell == 1 else (0,), float("nan"), dtype=st)
        dh0 = torch.full((B, H), float("nan"), dtype=cd)
        lens = None if lengths is None else lengths.long()
        sws = [self._load_w_backward(w_hh, pl, H, ub * pl.units, math, cd)
               for ub in range(pl.group_blocks)]
        ctx = dict(
            G=G, H=H, T=T, B=B, cell=cell, pl=pl, math=math, st=st, cd=cd, reverse=reverse,
            lens=lens, dy=dy.reshape(-1), gates=gates.to(cd).reshape(-1),
            aux=None if aux is None else aux.to(cd).reshape(-1),
            c0=None if c0 is None else c0.to(cd), hprev=None if hprev is None else hprev.reshape(-1),
            dh_carry=dh_carry, dc_carry=dc_carry, dgx=dgx.view(-1), dghn=dghn.view(-1), dh0=dh0,
        )
        for s in range(T + 1):
            din, dout = dgbuf[s & 1], dgbuf[(s + 1) & 1]
            din_before = din.clone()
            writer = torch.full((B_pad, pl.k_pad), -1, dtype=torch.long)
            for blk, ub, u0, nu, chunks in self._blocks(pl, H, B, B_pad):
                for n0, ncols in chunks:
                    nb = min(ncols, B - n0)
                    sc, nfr, ksplit = self._chunk_matmul(sws[ub], pl, din, n0, ncols, nb, math,
                                                         cd)
                    idx = torch.arange(nb * pl.units)
                    j, n = idx % pl.units, idx // pl.units
                    keep = j < nu
                    j, n = j[keep], n[keep]
                    b, u = n0 + n, u0 + j
                    self._backward_point(ctx, s, b, n, j, u, sc, nfr, ksplit, dout)
                    if s < T:
                        for g in range(G):
                            w = writer[b, g * H + u]
                            assert bool((w == -1).all()), "two writers of one exchange element"
                            writer[b, g * H + u] = blk
            if s < T:
                owner = self._owner(pl, B, B_pad, (torch.arange(G * H) % H) // pl.units)
                assert bool((writer[:B, : G * H] == owner).all())
                assert bool((writer[B:, :] == -1).all()) and bool((writer[:, G * H:] == -1).all())
            assert _same_bits(din, din_before), "the buffer being read was written"
        dc0 = dc_carry if cell == 0 else torch.empty(0, dtype=cd)
        return [dgx, dghn, dh0, dc0]

    @staticmethod
    def _backward_point(c, s, b, n, j, u, sc, nfr, ksplit, dout):
        G, H, T, B, cell, pl = c["G"], c["H"], c["T"], c["B"], c["cell"], c["pl"]
        cd, st = c["cd"], c["st"]
        rec = Emulator._gather(sc, pl, c["math"], nfr, ksplit, j, n)
        # rnn_backward.cu BackwardPoint::load: nothing through W_hh at s = 0 or after a
        # padding step of row b (0 * inf would be NaN)
        t_before = s - 1 if c["reverse"] else T - s
        no_rec = torch.full_like(b, s == 0, dtype=torch.bool)
        if c["lens"] is not None:
            no_rec |= t_before >= c["lens"][b]
        dh_in = torch.where(no_rec, c["dh_carry"][b, u], rec + c["dh_carry"][b, u])
        if s == T:
            c["dh0"][b, u] = dh_in
            return
        t = s if c["reverse"] else T - 1 - s
        tbh = (t * B + b) * H + u
        tg = (t * B + b) * G * H + u
        if c["lens"] is not None:
            pad = t >= c["lens"][b]
            c["dh_carry"][b[pad], u[pad]] = dh_in[pad]
            for g in range(G):
                c["dgx"][tg[pad] + g * H] = 0
                dout[b[pad], g * H + u[pad]] = 0
            if cell == 1:
                c["dghn"][tbh[pad]] = 0
            real = ~pad
            b, u, tbh, tg, dh_in = b[real], u[real], tbh[real], tg[real], dh_in[real]
        dh = dh_in + c["dy"][tbh].to(cd)  # fp32, unrounded (reference._StoreH)
        a = c["gates"]
        carry = torch.zeros_like(dh)
        if cell == 0:
            i, f, gg, o = a[tg], a[tg + H], a[tg + 2 * H], a[tg + 3 * H]
            cc = c["aux"][tbh]
            tp = t + 1 if c["reverse"] else t - 1
            if 0 <= tp < T:
                cprev = c["aux"][(tp * B + b) * H + u]
            else:
                cprev = c["c0"][b, u]
            tc = torch.tanh(cc)
            dc = c["dc_carry"][b, u] + dh * o * (1 - tc * tc)
            dg = [dc * gg * i * (1 - i), dc * cprev * f * (1 - f), dc * i * (1 - gg * gg),
                  dh * tc * o * (1 - o)]
            c["dc_carry"][b, u] = dc * f
            dgr = list(dg)
        elif cell == 1:
            r, z, nn = a[tg], a[tg + H], a[tg + 2 * H]
            hn = c["aux"][tbh]
            hp = c["hprev"][tbh].to(cd)
            dn = dh * (1 - z) * (1 - nn * nn)
            dg = [dn * hn * r * (1 - r), dh * (hp - nn) * z * (1 - z), dn]
            dgr = [dg[0], dg[1], dn * r]
            c["dghn"][tbh] = dgr[2].to(st)
            carry = dh * z
        else:
            act = a[tg]
            dg = [dh * (1 - act * act)] if cell == 2 else [torch.where(act <= 0, torch.zeros_like(dh), dh)]
            dgr = dg
        c["dh_carry"][b, u] = carry
        for g in range(G):
            c["dgx"][tg + g * H] = dg[g].to(st)
            dout[b, g * H + u] = dgr[g].to(st)
