//! Measures of a set of points in objective space (every objective maximised): which points are
//! on the Pareto front, the hypervolume they dominate above a reference point, and how evenly
//! they cover the front (sparsity, spacing). `mo-align pareto` is built on these.

/// Whether `a` Pareto-dominates `b`: at least as good on every objective, better on one.
pub fn dominates(a: &[f64], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x >= y) && a.iter().zip(b).any(|(x, y)| x > y)
}

/// Indices of the points no other point dominates (duplicates all kept), in input order.
pub fn non_dominated(points: &[Vec<f64>]) -> Vec<usize> {
    (0..points.len())
        .filter(|&i| !points.iter().any(|q| dominates(q, &points[i])))
        .collect()
}

/// The volume of the union of the boxes [reference, p] over `points`: exact, by slicing along
/// the last objective and recursing on the rest (O(n^d), meant for fronts of tens of points).
/// Points not strictly above the reference on every objective add nothing.
pub fn hypervolume(points: &[Vec<f64>], reference: &[f64]) -> f64 {
    let d = reference.len();
    let pts: Vec<&[f64]> = points
        .iter()
        .filter(|p| p.len() == d && p.iter().zip(reference).all(|(x, r)| x > r))
        .map(Vec::as_slice)
        .collect();
    slice_volume(&pts, reference)
}

fn slice_volume(points: &[&[f64]], reference: &[f64]) -> f64 {
    let d = reference.len();
    if points.is_empty() {
        return 0.0;
    }
    if d == 1 {
        return points.iter().map(|p| p[0]).fold(f64::MIN, f64::max) - reference[0];
    }
    // Walk down the last objective: between consecutive levels, the cross-section is the
    // (d-1)-dimensional union of every point at or above the upper level.
    let mut sorted: Vec<&[f64]> = points.to_vec();
    sorted.sort_by(|a, b| b[d - 1].total_cmp(&a[d - 1]));
    let mut volume = 0.0;
    for i in 0..sorted.len() {
        let top = sorted[i][d - 1];
        let bottom = sorted.get(i + 1).map_or(reference[d - 1], |p| p[d - 1]);
        if top > bottom {
            let section: Vec<&[f64]> = sorted[..=i].iter().map(|p| &p[..d - 1]).collect();
            volume += (top - bottom) * slice_volume(&section, &reference[..d - 1]);
        }
    }
    volume
}

/// PGMORL's sparsity: along each objective, the mean squared gap between neighbouring points
/// (sorted on that objective), summed over objectives. Lower is denser. 0 for fewer than two
/// points.
pub fn sparsity(points: &[Vec<f64>]) -> f64 {
    if points.len() < 2 {
        return 0.0;
    }
    let d = points[0].len();
    let mut total = 0.0;
    for k in 0..d {
        let mut v: Vec<f64> = points.iter().map(|p| p[k]).collect();
        v.sort_by(f64::total_cmp);
        total += v.windows(2).map(|w| (w[1] - w[0]).powi(2)).sum::<f64>();
    }
    total / (points.len() - 1) as f64
}

/// Schott's spacing: the standard deviation (n - 1 in the denominator) of each point's L1
/// distance to its nearest neighbour. 0 means evenly spaced. 0 for fewer than two points.
pub fn spacing(points: &[Vec<f64>]) -> f64 {
    let n = points.len();
    if n < 2 {
        return 0.0;
    }
    let l1 = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>();
    let nearest: Vec<f64> = (0..n)
        .map(|i| {
            (0..n)
                .filter(|&j| j != i)
                .map(|j| l1(&points[i], &points[j]))
                .fold(f64::INFINITY, f64::min)
        })
        .collect();
    let mean = nearest.iter().sum::<f64>() / n as f64;
    (nearest.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
}

/// Every weighting of `k` objectives in steps of 1/`n` (the simplex lattice: C(n+k-1, k-1)
/// points, vertices and centre included when `n` allows), in lexicographic order.
pub fn simplex_grid(k: usize, n: usize) -> Vec<Vec<f64>> {
    fn fill(k: usize, left: usize, prefix: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if prefix.len() == k - 1 {
            prefix.push(left);
            out.push(prefix.clone());
            prefix.pop();
            return;
        }
        for x in (0..=left).rev() {
            prefix.push(x);
            fill(k, left - x, prefix, out);
            prefix.pop();
        }
    }
    if k == 0 || n == 0 {
        return vec![];
    }
    let mut out = vec![];
    fill(k, n, &mut vec![], &mut out);
    out.into_iter()
        .map(|c| c.into_iter().map(|x| x as f64 / n as f64).collect())
        .collect()
}

/// Spearman's rank correlation of `x` and `y` (ties get their average rank; the Pearson
/// correlation of the ranks). `None` when either side is constant or they differ in length.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 {
        return None;
    }
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for &o in &order[i..=j] {
                r[o] = (i + j) as f64 / 2.0 + 1.0;
            }
            i = j + 1;
        }
        r
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn hypervolume_of_a_2d_staircase_by_hand() {
        // Points (1, 3), (2, 2), (3, 1) over reference (0, 0): a staircase of three steps,
        // 3*1 + 2*1 + 1*1 = 6.
        let front = vec![vec![1.0, 3.0], vec![2.0, 2.0], vec![3.0, 1.0]];
        close(hypervolume(&front, &[0.0, 0.0]), 6.0);
        // A dominated point and a point below the reference change nothing.
        let mut more = front.clone();
        more.push(vec![1.5, 1.5]);
        more.push(vec![5.0, -1.0]);
        close(hypervolume(&more, &[0.0, 0.0]), 6.0);
        // Reference (0.5, 0.5), in strips along x: [0.5, 1] x 2.5 + [1, 2] x 1.5 + [2, 3] x 0.5.
        close(hypervolume(&front, &[0.5, 0.5]), 1.25 + 1.5 + 0.5);
        // Points level with the reference on an objective add nothing: only (2, 2) counts.
        close(hypervolume(&front, &[1.0, 1.0]), 1.0);
    }

    #[test]
    fn hypervolume_of_a_3d_front_by_hand() {
        // Unit-offset boxes: a = (2,1,1), b = (1,2,1), c = (1,1,2) over the origin. Each box has
        // volume 2; each pairwise intersection is the unit cube [0,1]^3, as is the triple one:
        // 3*2 - 3*1 + 1 = 4.
        let front = vec![
            vec![2.0, 1.0, 1.0],
            vec![1.0, 2.0, 1.0],
            vec![1.0, 1.0, 2.0],
        ];
        close(hypervolume(&front, &[0.0, 0.0, 0.0]), 4.0);
        // A single box is its volume; adding (2,2,2) covers them all: 8.
        close(hypervolume(&front[..1], &[0.0, 0.0, 0.0]), 2.0);
        let mut all = front.clone();
        all.push(vec![2.0, 2.0, 2.0]);
        close(hypervolume(&all, &[0.0, 0.0, 0.0]), 8.0);
    }

    #[test]
    fn front_and_spread_measures() {
        let pts = vec![
            vec![1.0, 3.0],
            vec![2.0, 2.0],
            vec![1.5, 1.5],
            vec![3.0, 1.0],
            vec![2.0, 2.0],
        ];
        assert_eq!(non_dominated(&pts), vec![0, 1, 3, 4]);
        let front = vec![vec![1.0, 3.0], vec![2.0, 2.0], vec![3.0, 1.0]];
        // Gaps of 1 on both objectives: (1 + 1) + (1 + 1) over n - 1 = 2.
        close(sparsity(&front), 2.0);
        // Evenly spaced: every nearest L1 distance is 2.
        close(spacing(&front), 0.0);
        let uneven = vec![vec![1.0, 3.0], vec![1.5, 2.5], vec![3.0, 1.0]];
        // Nearest distances 1, 1, 3: mean 5/3, deviations (-2/3, -2/3, 4/3): sqrt((8/3)/2).
        close(spacing(&uneven), (4.0f64 / 3.0).sqrt());
    }

    #[test]
    fn simplex_grid_and_spearman() {
        let g = simplex_grid(4, 4);
        assert_eq!(g.len(), 35);
        assert!(g.contains(&vec![0.25; 4]));
        assert!(g.contains(&vec![1.0, 0.0, 0.0, 0.0]));
        assert!(g
            .iter()
            .all(|w| (w.iter().sum::<f64>() - 1.0).abs() < 1e-12));
        assert_eq!(
            simplex_grid(2, 2),
            vec![vec![1.0, 0.0], vec![0.5, 0.5], vec![0.0, 1.0]]
        );
        // Ranks by hand: x = 1, 2.5, 2.5, 4 against y = 1, 2, 3, 4 gives 0.9487 (= 3 / sqrt(10)).
        let r = spearman(&[0.0, 0.5, 0.5, 1.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((r - 3.0 / 10f64.sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    /// The ceiling the README quotes for the demo's steering: under its rules a hedge is
    /// (helpfulness, honesty, instruction following) = (-1, +1, -1) and detail (+1, 0, -2), so a
    /// policy that does what the weights ask hedges when w1 > w0 + w2 and adds detail when
    /// w0 > 2 w2. Its rho on the 35-weighting grid is capped, whether it chooses all or nothing
    /// or hedges a share of answers rising with the weights' advantage for the style.
    #[test]
    fn weight_following_policy_caps_rho_on_the_demo_grid() {
        let grid = simplex_grid(4, 4);
        let rho = |k: usize, scores: &dyn Fn(&[f64]) -> [f64; 3]| {
            let w: Vec<f64> = grid.iter().map(|w| w[k]).collect();
            let s: Vec<f64> = grid.iter().map(|w| scores(w)[k]).collect();
            (spearman(&w, &s).unwrap() * 100.0).round() / 100.0
        };
        let styled = |hedge: f64, detail: f64| {
            [
                4.0 + detail - hedge,
                4.0 + hedge,
                5.0 - 2.0 * detail - hedge,
            ]
        };
        let step = |x: f64| if x > 0.0 { 1.0 } else { 0.0 };
        let all_or_nothing = |w: &[f64]| styled(step(w[1] - w[0] - w[2]), step(w[0] - 2.0 * w[2]));
        let graded = |w: &[f64]| {
            let sigmoid = |x: f64| 1.0 / (1.0 + (-x / 0.1).exp());
            styled(sigmoid(w[1] - w[0] - w[2]), sigmoid(w[0] - 2.0 * w[2]))
        };
        let caps = |f: &dyn Fn(&[f64]) -> [f64; 3]| [rho(0, f), rho(1, f), rho(2, f)];
        assert_eq!(caps(&all_or_nothing), [0.74, 0.68, 0.79]);
        assert_eq!(caps(&graded), [0.86, 0.83, 0.93]);
    }
}
