"""Independent NumPy (float64) reference implementations, written from /work/shared/NOTES.md and the API contract.

Everything here is deliberately naive: plain Python loops over positions, regions, cells and clusters, explicit
nearest-centroid search, explicit GMM posteriors with log-sum-exp. Nothing here imports or calls ``aggnets``.

Conventions: a feature map is a NumPy array ``X`` of shape (C, H, W); a mask is a bool array (H, W), True = valid.
"""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------------------------------------------------
# helpers


def as_np(t) -> np.ndarray:
    """Torch tensor (any dtype/device) or array-like -> float64 NumPy array."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def l2n(v) -> np.ndarray:
    """v / ||v||; the zero vector stays zero."""
    v = np.asarray(v, dtype=np.float64)
    n = math.sqrt(sum(float(e) * float(e) for e in v.ravel()))
    if n == 0.0:
        return v.copy()
    return v / n


def signed_power(v, power) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return np.sign(v) * np.abs(v) ** power


def descriptors(X, mask=None) -> np.ndarray:
    """(C, H, W) map -> (N, C) array of the local descriptors at valid positions, row-major order."""
    X = np.asarray(X, dtype=np.float64)
    C, H, W = X.shape
    out = []
    for i in range(H):
        for j in range(W):
            if mask is None or bool(mask[i, j]):
                out.append([X[c, i, j] for c in range(C)])
    return np.array(out, dtype=np.float64).reshape(len(out), C)


def bbox(mask, H, W):
    """Bounding box (r0, r1, c0, c1) (half-open) of the True positions of mask; whole map when mask is None."""
    if mask is None:
        return 0, H, 0, W
    rows = [i for i in range(H) if any(bool(mask[i, j]) for j in range(W))]
    cols = [j for j in range(W) if any(bool(mask[i, j]) for i in range(H))]
    return min(rows), max(rows) + 1, min(cols), max(cols) + 1


# ----------------------------------------------------------------------------------------------------------------------
# global pooling, on an (N, C) descriptor array


def mac_ref(D) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    N, C = D.shape
    out = np.empty(C)
    for c in range(C):
        m = -math.inf
        for n in range(N):
            if D[n, c] > m:
                m = D[n, c]
        out[c] = m
    return out


def spoc_ref(D) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    N, C = D.shape
    out = np.zeros(C)
    for n in range(N):
        out += D[n]
    return out / N


def gem_ref(D, p=3.0, eps=1e-6) -> np.ndarray:
    """f_c = ( (1/N) sum_n max(x_nc, eps)^p_c )^(1/p_c); p scalar or per channel."""
    D = np.asarray(D, dtype=np.float64)
    N, C = D.shape
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.size == 1:
        p = np.full(C, p[0])
    out = np.empty(C)
    for c in range(C):
        s = 0.0
        for n in range(N):
            s += max(D[n, c], eps) ** p[c]
        out[c] = (s / N) ** (1.0 / p[c])
    return out


def crow_ref(D, a=2.0, b=2.0, eps=1e-6) -> np.ndarray:
    """CroW (Kalantidis et al. 2016), contract form:
    S_n = max(sum_c x_nc, 0); S'_n = (S_n / (sum_m S_m^a)^(1/a))^(1/b);
    Q_c = fraction of valid positions with x_nc > 0; Omega_c = log(sum_k Q_k / (eps + Q_c));
    f_c = Omega_c * sum_n S'_n x_nc."""
    D = np.asarray(D, dtype=np.float64)
    N, C = D.shape
    S = [max(sum(D[n, c] for c in range(C)), 0.0) for n in range(N)]
    norm = sum(s ** a for s in S) ** (1.0 / a)
    Sp = [(s / norm) ** (1.0 / b) for s in S]
    Q = [sum(1 for n in range(N) if D[n, c] > 0) / N for c in range(C)]
    sumQ = sum(Q)
    out = np.empty(C)
    for c in range(C):
        omega = math.log(sumQ / (eps + Q[c]))
        out[c] = omega * sum(Sp[n] * D[n, c] for n in range(N))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# R-MAC


def _offsets(S: int, side: int, n: int):
    """Uniform placement of n windows of size `side` along an axis of length S (exact integer floor)."""
    if n == 1:
        return [0]
    return [(i * (S - side)) // (n - 1) for i in range(n)]


def rmac_regions_ref(H: int, W: int, levels: int = 3, overlap: float = 0.4):
    """Tolias et al. (ICLR 2016) region grid, transcribed from their MATLAB rmac_regions.m.

    The overlap criterion is evaluated with the same floating-point expression as the MATLAB code:
        b = (max(H,W) - w) ./ (steps - 1);  [~, idx] = min(abs(((w.^2 - w.*b)./w.^2) - ovr));
    """
    w = min(H, W)
    long_ = max(H, W)
    best_idx, best_val = 0, None
    for idx, steps in enumerate(range(2, 8)):
        b = (long_ - w) / (steps - 1)
        val = abs(((w * w - w * b) / (w * w)) - overlap)
        if best_val is None or val < best_val:  # first minimum, like MATLAB's min
            best_idx, best_val = idx, val
    extra = best_idx + 1  # MATLAB's 1-based idx
    extra_h = extra if H > W else 0
    extra_w = extra if W > H else 0
    regions = []
    for l in range(1, levels + 1):
        side = (2 * w) // (l + 1)
        if side == 0:
            continue
        tops = _offsets(H, side, l + extra_h)
        lefts = _offsets(W, side, l + extra_w)
        for t in tops:
            for le in lefts:
                regions.append((t, le, side))
    return regions


def rmac_ref(X, mask=None, levels=3, overlap=0.4, include_global=False, pool="max", p=3.0, eps=1e-6) -> np.ndarray:
    """v = L2( sum_r L2( pool_r(x) ) ) with the grid laid on the bounding box of the valid positions."""
    X = np.asarray(X, dtype=np.float64)
    C, H, W = X.shape
    r0, r1, c0, c1 = bbox(mask, H, W)
    Xb = X[:, r0:r1, c0:c1]
    mb = None if mask is None else np.asarray(mask)[r0:r1, c0:c1]
    Hb, Wb = r1 - r0, c1 - c0
    windows = [(t, le, s, s) for (t, le, s) in rmac_regions_ref(Hb, Wb, levels, overlap)]
    if include_global:
        windows.append((0, 0, Hb, Wb))
    total = np.zeros(C)
    for (t, le, hh, ww) in windows:
        D = []
        for i in range(t, t + hh):
            for j in range(le, le + ww):
                if mb is None or bool(mb[i, j]):
                    D.append(Xb[:, i, j])
        D = np.array(D)
        v = mac_ref(D) if pool == "max" else gem_ref(D, p, eps)
        total = total + l2n(v)
    return l2n(total)


# ----------------------------------------------------------------------------------------------------------------------
# spatial pyramid


def cell_bounds(S: int, l: int):
    """Adaptive-pooling cells along an axis: cell i spans [floor(i*S/l), ceil((i+1)*S/l))."""
    return [((i * S) // l, -((-(i + 1) * S) // l)) for i in range(l)]


def pyramid_ref(X, cell_fn, cell_dim, levels=(1, 2, 4), mask=None) -> np.ndarray:
    """Concatenation over levels, then cells row-major, of cell_fn(descriptors of the cell); empty cell -> zeros."""
    X = np.asarray(X, dtype=np.float64)
    C, H, W = X.shape
    r0, r1, c0, c1 = bbox(mask, H, W)
    Xb = X[:, r0:r1, c0:c1]
    mb = None if mask is None else np.asarray(mask)[r0:r1, c0:c1]
    Hb, Wb = r1 - r0, c1 - c0
    parts = []
    for l in levels:
        for (a0, a1) in cell_bounds(Hb, l):
            for (b0, b1) in cell_bounds(Wb, l):
                D = []
                for i in range(a0, a1):
                    for j in range(b0, b1):
                        if mb is None or bool(mb[i, j]):
                            D.append(Xb[:, i, j])
                parts.append(np.zeros(cell_dim) if not D else np.asarray(cell_fn(np.array(D)), dtype=np.float64))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------------------------------
# codebook encodings, on an (N, C) descriptor array


def nearest_centroid(x, centroids) -> int:
    """Explicit nearest-centroid search by squared Euclidean distance (first minimum)."""
    best_k, best_d = -1, math.inf
    for k in range(len(centroids)):
        d = sum((float(x[c]) - float(centroids[k][c])) ** 2 for c in range(len(x)))
        if d < best_d:
            best_k, best_d = k, d
    return best_k


def softmax_lse(z) -> np.ndarray:
    z = [float(v) for v in z]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return np.array([math.exp(v - lse) for v in z])


def assignment_ref(x, weight, bias, assignment="soft") -> np.ndarray:
    """a_k(x) = softmax_k(w_k.x + b_k) (soft) or one-hot argmax_k (hard)."""
    K = weight.shape[0]
    logits = [float(np.dot(weight[k], x)) + (0.0 if bias is None else float(bias[k])) for k in range(K)]
    if assignment == "soft":
        return softmax_lse(logits)
    a = np.zeros(K)
    a[int(np.argmax(logits))] = 1.0
    return a


def vlad_ref(D, centroids, normalize_input=False, intra_norm=False, power=None) -> np.ndarray:
    """Classical VLAD (Jegou et al. 2010): v_k = sum_{n: NN(x_n)=k} (x_n - mu_k); optional input L2, signed power,
    intra-normalisation; flatten k-major; L2."""
    D = np.asarray(D, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    K, C = centroids.shape
    V = np.zeros((K, C))
    for x in D:
        if normalize_input:
            x = l2n(x)
        k = nearest_centroid(x, centroids)
        V[k] += x - centroids[k]
    if power is not None:
        V = signed_power(V, power)
    if intra_norm:
        V = np.stack([l2n(V[k]) for k in range(K)])
    return l2n(V.reshape(-1))


def netvlad_ref(D, centroids, weight, bias, normalize_input=True, intra_norm=True, power=None,
                assignment="soft") -> np.ndarray:
    """NetVLAD (Arandjelovic et al. 2016) by a per-descriptor, per-cluster loop."""
    D = np.asarray(D, dtype=np.float64)
    centroids = np.asarray(centroids, dtype=np.float64)
    K, C = centroids.shape
    V = np.zeros((K, C))
    for x in D:
        if normalize_input:
            x = l2n(x)
        a = assignment_ref(x, weight, bias, assignment)
        for k in range(K):
            V[k] += a[k] * (x - centroids[k])
    if power is not None:
        V = signed_power(V, power)
    if intra_norm:
        V = np.stack([l2n(V[k]) for k in range(K)])
    return l2n(V.reshape(-1))


def bof_ref(D, centroids) -> np.ndarray:
    """Hard BoF: L1-normalised histogram of nearest-centroid counts."""
    centroids = np.asarray(centroids, dtype=np.float64)
    K = centroids.shape[0]
    h = np.zeros(K)
    for x in np.asarray(D, dtype=np.float64):
        h[nearest_centroid(x, centroids)] += 1.0
    return h / h.sum()


def netbof_ref(D, weight, bias, normalize_input=False, assignment="soft") -> np.ndarray:
    """h_k = (1/N) sum_n a_k(x_n)."""
    D = np.asarray(D, dtype=np.float64)
    K = weight.shape[0]
    h = np.zeros(K)
    for x in D:
        if normalize_input:
            x = l2n(x)
        h += assignment_ref(x, weight, bias, assignment)
    return h / len(D)


def gmm_posteriors_ref(x, weights, means, variances) -> np.ndarray:
    K, C = means.shape
    logp = []
    for k in range(K):
        s = math.log(weights[k])
        for c in range(C):
            s += -0.5 * (math.log(2.0 * math.pi * variances[k, c]) + (x[c] - means[k, c]) ** 2 / variances[k, c])
        logp.append(s)
    return softmax_lse(logp)


def fisher_vector_ref(D, weights, means, variances, power=0.5) -> np.ndarray:
    """Improved Fisher vector (Perronnin et al. 2010): [G^mu (K,C), G^sigma (K,C)], signed power, L2."""
    D = np.asarray(D, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    variances = np.asarray(variances, dtype=np.float64)
    K, C = means.shape
    N = len(D)
    Gmu = np.zeros((K, C))
    Gsig = np.zeros((K, C))
    for x in D:
        g = gmm_posteriors_ref(x, weights, means, variances)
        for k in range(K):
            for c in range(C):
                sigma = math.sqrt(variances[k, c])
                d = x[c] - means[k, c]
                Gmu[k, c] += g[k] * d / sigma
                Gsig[k, c] += g[k] * (d * d / variances[k, c] - 1.0)
    for k in range(K):
        Gmu[k] /= N * math.sqrt(weights[k])
        Gsig[k] /= N * math.sqrt(2.0 * weights[k])
    v = np.concatenate([Gmu.ravel(), Gsig.ravel()])
    if power is not None:
        v = signed_power(v, power)
    return l2n(v)


# ----------------------------------------------------------------------------------------------------------------------
# batch helper


def per_image(fn, X, mask=None) -> np.ndarray:
    """Apply fn(X_b (C,H,W), mask_b or None) to each image of a (B, C, H, W) batch; stack."""
    X = as_np(X)
    M = None if mask is None else np.asarray(mask.cpu().numpy() if hasattr(mask, "cpu") else mask, dtype=bool)
    return np.stack([fn(X[b], None if M is None else M[b]) for b in range(X.shape[0])])
