"""The style and script of ``explore.html`` (kept as Python strings so they ship inside the wheel).

The script reads ``#vitkit-meta`` (JSON) and ``#vitkit-data`` (base64 of a zlib buffer of the
arrays :func:`vitkit.viz.explore.pack` wrote), inflates it with ``DecompressionStream``, and draws
the chosen map over the image on one canvas (and image B's canvas in the correspondence view). It
computes nothing about the model: it only decodes rows (dense codes, or a head's top-k keys in
the compact encoding), averages them (the ``mean`` head of the dense encoding, the ``mean``
readout query over the patch queries, the attention-pooling query's mix of rows) and colours them.

For tests it records on ``<body>``: ``data-ready="1"`` after the first render, ``data-state``
(the canonical fragment), ``data-error`` if decoding failed.
"""

PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .5em 0; }
#app { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
canvas { border: 1px solid #ccc; cursor: crosshair; display: block; }
.controls label { display: block; margin: .5em 0 .2em 0; font-weight: 600; font-size: .9em; }
.controls { min-width: 280px; max-width: 420px; }
#prefix button, #readout button { margin: 2px; padding: 2px 8px; border: 2px solid #888; border-radius: 4px;
  font: 12px monospace; cursor: pointer; }
#prefix button.sel, #readout button.sel { border-color: #00e5ff; box-shadow: 0 0 0 2px #00e5ff; }
#info { font: 13px monospace; margin-top: .5em; max-width: 520px; white-space: pre-wrap; }
table { border-collapse: collapse; font-size: .9em; margin-top: .5em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; }
tr.cls { cursor: pointer; } tr.sel td { background: #e0f7fa; }
.bar { background: #3b528b; height: 10px; display: inline-block; }
.note { color: #555; font-size: .85em; max-width: 420px; }
#viewb { margin-top: .5em; }
"""

PAGE_SCRIPT = r"""
(async function () {
  'use strict';
  const body = document.body;
  const meta = JSON.parse(document.getElementById('vitkit-meta').textContent);
  const [GH, GW] = meta.grid, [PH, PW] = meta.patch, [IH, IW] = meta.image;
  const L = meta.layers, H = meta.heads, T = meta.tokens;
  const PREFIX = meta.prefix, R = PREFIX.length, N = GH * GW;
  const CLASSES = meta.classes;
  const MODES = ['attention', 'rollout'].concat(CLASSES.length ? ['attribution'] : [], ['similarity', 'pca', 'pca-fg',
    'norms'], meta.compare ? ['correspond'] : []);
  const COMPACT = meta.encoding === 'compact', LV = meta.levels, K = meta.topk;
  const SERVED = !!meta.served;  // vitkit explore: rows come from the local server, at full precision
  const TYPED = {u8: Uint8Array, u16: Uint16Array, f32: Float32Array};

  async function decode() {
    const s = atob(document.getElementById('vitkit-data').textContent.trim());
    const bytes = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
    const buf = await new Response(stream).arrayBuffer();
    const out = {};
    for (const [name, a] of Object.entries(meta.arrays)) {
      out[name] = new TYPED[a.dtype](buf, a.offset, a.size);
    }
    return out;
  }
  let D;
  try { D = await decode(); } catch (e) {
    body.setAttribute('data-error', String(e));
    document.getElementById('app').textContent = 'Could not decode the data (this page needs a browser with ' +
      'DecompressionStream: Chrome/Edge 80+, Firefox 113+, Safari 16.4+): ' + e;
    throw e;
  }
  async function loadImage(src) { const im = new Image(); im.src = src; await im.decode(); return im; }
  const img = await loadImage(meta.image_png);
  const imgB = meta.compare ? await loadImage(meta.compare.image_png) : null;

  // ---------------------------------------------------------------- rows of the maps (length T)
  function rowQ(q, s, r) {  // codes 0..LV times the row maximum / LV
    const out = new Float64Array(T), k = s[r] / LV, base = r * T;
    for (let t = 0; t < T; t++) out[t] = q[base + t] * k;
    return out;
  }
  function rowTopK(I, V, S, r, k, fill) {  // compact: a row's k largest entries (8-bit of the row maximum)
    const out = new Float64Array(T).fill(fill), m = S[r] / 255, base = r * k;
    for (let i = 0; i < k; i++) out[I[base + i]] = V[base + i] * m;
    return out;
  }
  function tokenRow(st, t) {  // the row of token t in the current mode / layer / head
    const l = st.layer;
    if (st.mode === 'attention') {
      if (COMPACT) return st.head === 'mean' ? rowQ(D.attnm_q, D.attnm_s, l * T + t) : rowTopK(D.attn_i, D.attn_v, D.attn_s, (l * H + st.head) * T + t, K, 0);
      if (st.head !== 'mean') return rowQ(D.attn_q, D.attn_s, (l * H + st.head) * T + t);
      const out = new Float64Array(T);
      for (let h = 0; h < H; h++) { const r = rowQ(D.attn_q, D.attn_s, (l * H + h) * T + t); for (let j = 0; j < T; j++) out[j] += r[j] / H; }
      return out;
    }
    if (st.mode === 'rollout') return rowQ(D.roll_q, D.roll_s, l * T + t);
    if (st.mode === 'attribution') {  // shipped per layer, or for the last layer only (meta.reduced)
      const LA = meta.arrays.attr_q.shape[1];
      return rowQ(D.attr_q, D.attr_s, (classRank(st.cls) * LA + (LA === L ? l : 0)) * T + t);
    }
    if (st.mode === 'norms') return Float64Array.from(D.norms.subarray(l * T, (l + 1) * T));  // the query plays no part
    if (COMPACT) {  // the most similar tokens, shipped as (s + 1) / 2; the others at their bound
      const r = l * T + t, u = rowTopK(D.sim_i, D.sim_v, D.sim_s, r, meta.sim_topk, D.sim_r[r] * D.sim_s[r] / 255);
      for (let j = 0; j < T; j++) u[j] = 2 * u[j] - 1;
      return u;
    }
    const out = new Float64Array(T), base = (l * T + t) * T;  // similarity: fixed [-1, 1] code
    for (let j = 0; j < T; j++) out[j] = D.sim_q[base + j] * (2 / LV) - 1;
    return out;
  }
  function keyBound(st) {  // compact, one head / similarity: every token not shipped is at most this
    if (!COMPACT || typeof st.patch !== 'number' && !PREFIX.includes(st.patch)) return null;
    if (st.mode === 'attention' && st.head !== 'mean') {
      const r = (st.layer * H + st.head) * T + tokenIndex(st.patch);
      return D.attn_r[r] * D.attn_s[r] / 255;
    }
    if (st.mode === 'similarity') { const r = st.layer * T + tokenIndex(st.patch); return 2 * D.sim_r[r] * D.sim_s[r] / 255 - 1; }
    return null;
  }
  function mix(st, weights) {  // sum_t w_t * row_t
    const out = new Float64Array(T);
    for (let t = 0; t < T; t++) { if (!weights[t]) continue; const r = tokenRow(st, t); for (let j = 0; j < T; j++) out[j] += weights[t] * r[j]; }
    return out;
  }
  function poolWeights(head) {  // the attention-pooling query's weights over the tokens
    const w = new Float64Array(T);
    for (let h = 0; h < H; h++) if (head === 'mean' || head === h) for (let t = 0; t < T; t++) w[t] += D.pool[h * T + t] / (head === 'mean' ? H : 1);
    return w;
  }
  function queryRow(st, p) {
    if (p === 'mean') { const w = new Float64Array(T); for (let t = R; t < T; t++) w[t] = 1 / N; return mix(st, w); }
    if (p === 'map') {
      // the pooling head attends once, after the last block: in attention mode its own weights;
      // otherwise its (head-averaged) weights mix the token rows of the chosen map
      if (st.mode === 'attention') return poolWeights(st.head);
      return mix(st, poolWeights('mean'));
    }
    return tokenRow(st, tokenIndex(p));
  }
  function tokenIndex(p) { return typeof p === 'number' ? R + p : PREFIX.indexOf(p); }
  function classRank(k) { const i = CLASSES.findIndex(c => c.index === k); return i < 0 ? 0 : i; }

  // ---------------------------------------------------------------- state <-> fragment
  const queries = PREFIX.slice();
  if (meta.readout === 'mean' || meta.readout === 'map') queries.push(meta.readout);
  const state = {mode: 'attention', layer: L - 1, head: 'mean', patch: meta.readout,
                 cls: CLASSES.length ? CLASSES[0].index : null};
  function parsePatch(v) {
    if (/^\d+$/.test(v) && +v < N) return +v;
    if (queries.includes(v)) return v;
    return undefined;
  }
  function applyFragment(frag) {
    const p = new URLSearchParams(frag.replace(/^#/, ''));
    const bad = [];
    if (p.has('mode')) { if (MODES.includes(p.get('mode'))) state.mode = p.get('mode'); else bad.push('mode'); }
    if (p.has('layer')) { const l = +p.get('layer'); if (Number.isInteger(l) && l >= 0 && l < L) state.layer = l; else bad.push('layer'); }
    if (p.has('head')) { const h = p.get('head'); if (h === 'mean') state.head = 'mean'; else if (/^\d+$/.test(h) && +h < H) state.head = +h; else bad.push('head'); }
    if (p.has('patch')) { const q = parsePatch(p.get('patch')); if (q !== undefined) state.patch = q; else bad.push('patch'); }
    if (p.has('class')) { const k = +p.get('class'); if (CLASSES.some(c => c.index === k)) state.cls = k; else bad.push('class'); }
    if (bad.length) console.warn('explore: ignored fragment values for ' + bad.join(', '));
  }
  function fragment() {
    let f = 'layer=' + state.layer + '&head=' + state.head + '&patch=' + state.patch + '&mode=' + state.mode;
    if (state.cls !== null) f += '&class=' + state.cls;
    return f;
  }

  // ---------------------------------------------------------------- page
  const app = document.getElementById('app');
  const scale = Math.max(IH, IW) <= 480 ? Math.max(1, Math.floor(480 / Math.max(IH, IW))) : 480 / Math.max(IH, IW);
  const cw = Math.round(IW * scale), ch = Math.round(IH * scale);
  const [BH, BW] = meta.compare ? meta.compare.image : [0, 0], [BGH, BGW] = meta.compare ? meta.compare.grid : [0, 0];
  const cwB = Math.round(BW * scale), chB = Math.round(BH * scale);
  app.innerHTML = `
    <div class="left">
      <div id="prefix"></div>
      <canvas id="view" width="${cw}" height="${ch}"></canvas>
      ${meta.compare ? `<canvas id="viewb" width="${cwB}" height="${chB}"></canvas>` : ''}
      <div id="info"></div>
    </div>
    <div class="controls">
      <label for="mode">mode</label><select id="mode">${MODES.map(m => `<option value="${m}">${m}</option>`).join('')}</select>
      <label for="layer">layer <span id="layerval"></span></label><input type="range" id="layer" min="0" max="${L - 1}" step="1">
      <label for="head">head</label><select id="head"><option value="mean">mean</option>${Array.from({length: H}, (_, h) => `<option value="${h}">${h}</option>`).join('')}</select>
      <label for="cls">class (attribution)</label><select id="cls">${CLASSES.map(c => `<option value="${c.index}">${esc(c.name)} (${c.p.toFixed(3)})</option>`).join('')}</select>
      <label>prediction</label><table id="preds"></table>
      <p class="note" id="note"></p>
    </div>`;
  function esc(s) { return String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'})[c]); }
  const canvas = document.getElementById('view'), ctx = canvas.getContext('2d');
  const $ = id => document.getElementById(id);
  const prefixDiv = $('prefix');
  for (const q of queries) {
    const b = document.createElement('button');
    b.textContent = q; b.dataset.q = q;
    b.title = q === 'mean' ? 'readout: mean over the patch queries (mean pooling)' :
              q === 'map' ? 'readout: the attention-pooling head\'s query' : 'prefix token ' + q;
    b.addEventListener('click', () => { state.patch = q; update(); });
    prefixDiv.appendChild(b);
  }
  const preds = meta.predictions;
  $('preds').innerHTML = preds.length ? preds.map(p => `<tr class="${CLASSES.some(c => c.index === p.index) ? 'cls' : ''}" data-k="${p.index}"><td>${esc(p.name)}</td><td>${
      p.p !== undefined ? p.p.toFixed(4) + ` <span class="bar" style="width:${Math.round(p.p * 120)}px"></span>` : p.value.toFixed(4)}</td></tr>`).join('')
    : '<tr><td>no classification head (num_classes = 0): features only</td></tr>';
  for (const tr of document.querySelectorAll('#preds tr.cls')) {
    tr.addEventListener('click', () => { state.cls = +tr.dataset.k; state.mode = 'attribution'; update(); });
  }
  $('mode').addEventListener('change', e => { state.mode = e.target.value; update(); });
  $('layer').addEventListener('input', e => { state.layer = +e.target.value; update(); });
  $('head').addEventListener('change', e => { state.head = e.target.value === 'mean' ? 'mean' : +e.target.value; update(); });
  $('cls').addEventListener('change', e => { state.cls = +e.target.value; update(); });
  if (!CLASSES.length) $('cls').disabled = true;

  const NOTES = {
    attention: 'Attention weights of the query token over the patches at this layer and head, as the model ' +
      'computed them (8-bit per row: error at most 0.2% of the row maximum).',
    rollout: 'Attention rollout (Abnar & Zuidema 2020) over layers 0..layer: heads averaged, identity added ' +
      'for the residual, rows renormalised, multiplied. The head selector does not apply.',
    attribution: 'Class relevance (Chefer, Gur & Wolf 2021): gradient of the chosen class logit times the ' +
      'attention, positive part, averaged over heads, R = R + A R from the identity, layers 0..layer.',
    similarity: 'Cosine similarity of the query token\'s output at this layer to every token ' +
      '(colour range from the smallest to the largest patch value).',
    pca: 'PCA of the patch features (block output, final norm) at this layer: the first three components ' +
      'as RGB, each min-max scaled (DINOv2 paper, Figure 1). The query plays no part.',
    'pca-fg': 'Foreground PCA (DINOv2 README): the first component, min-max scaled and oriented so the image ' +
      'border is low, thresholded at 0.5; a second PCA over the foreground patches as RGB, background black.',
    norms: 'L2 norm of every token output by this block (before the final norm): register-free ViTs grow a few ' +
      'high-norm artefact tokens (Darcet et al. 2024); the prefix buttons show the class/register tokens\' norms.',
    correspond: 'Click a patch of image A (top): image B (below) shows the ' + (meta.compare ? meta.compare.k : 0) +
      ' most similar B patches by cosine of the final-normed patch tokens at this layer (8-bit), the best outlined.',
  };
  const PRECISION = Object.assign({}, meta.precision || {}, {pca: '8-bit per channel', 'pca-fg': '8-bit per channel',
    norms: 'float32', correspond: '8-bit cosines (error at most 1/255)'});

  // viridis, 5 anchors, linear in between
  const CMAP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colour(v) {
    const x = Math.min(1, Math.max(0, v)) * (CMAP.length - 1), i = Math.min(CMAP.length - 2, Math.floor(x)), f = x - i;
    return CMAP[i].map((c, j) => Math.round(c + f * (CMAP[i + 1][j] - c)));
  }
  function normalise(row, mode) {  // over the patch keys
    let lo = Infinity, hi = -Infinity;
    for (let t = R; t < T; t++) { lo = Math.min(lo, row[t]); hi = Math.max(hi, row[t]); }
    // attention weights: from 0 (their scale means something); rollout and relevance carry the
    // identity's uniform share (1/N for the mean query) and similarity is signed: min to max
    if (mode === 'attention') lo = Math.min(0, lo);
    const span = hi - lo > 0 ? hi - lo : 1;
    return v => (v - lo) / span;
  }
  function patchAt(ev) {
    const r = canvas.getBoundingClientRect();
    const x = (ev.clientX - r.left) / r.width * IW, y = (ev.clientY - r.top) / r.height * IH;
    const i = Math.floor(y / PH), j = Math.floor(x / PW);
    return i >= 0 && i < GH && j >= 0 && j < GW ? i * GW + j : null;
  }

  function paint(c, image, w, h, gh, gw, colours, alpha) {  // image, then one colour per patch (or null), grid
    const g = c.getContext('2d');
    g.imageSmoothingEnabled = false;
    g.globalAlpha = 1;
    g.drawImage(image, 0, 0, w, h);
    g.globalAlpha = alpha;
    for (let p = 0; p < gh * gw; p++) {
      if (!colours[p]) continue;
      const [r, gg, b] = colours[p];
      g.fillStyle = `rgb(${r},${gg},${b})`;
      const i = Math.floor(p / gw), j = p % gw;
      g.fillRect(Math.round(j * w / gw), Math.round(i * h / gh), Math.round((j + 1) * w / gw) - Math.round(j * w / gw),
                 Math.round((i + 1) * h / gh) - Math.round(i * h / gh));
    }
    g.globalAlpha = 0.25; g.strokeStyle = '#fff'; g.lineWidth = 1;
    g.beginPath();
    for (let i = 1; i < gh; i++) { const y = Math.round(i * h / gh) + 0.5; g.moveTo(0, y); g.lineTo(w, y); }
    for (let j = 1; j < gw; j++) { const x = Math.round(j * w / gw) + 0.5; g.moveTo(x, 0); g.lineTo(x, h); }
    g.stroke();
    g.globalAlpha = 1;
  }
  function outline(c, p, w, h, gh, gw, colour) {
    const g = c.getContext('2d'), i = Math.floor(p / gw), j = p % gw;
    g.strokeStyle = colour; g.lineWidth = 3;
    g.strokeRect(j * w / gw + 1.5, i * h / gh + 1.5, w / gw - 3, h / gh - 3);
  }
  function renderDense(st) {  // pca, pca-fg, correspond: colours that are not one row of a map
    const l = st.layer, colours = new Array(N).fill(null);
    let text = `layer ${l}/${L - 1} | ${st.mode}`;
    if (st.mode === 'correspond') {
      paint(canvas, img, cw, ch, GH, GW, colours, 0.6);
      const p = typeof st.patch === 'number' ? st.patch : null, NB = BGH * BGW, KB = meta.compare.k;
      const cb = new Array(NB).fill(null), canvasB = $('viewb');
      const best = [];
      if (p !== null) {
        for (let i = 0; i < KB; i++) {
          const b = D.corr_i[(l * N + p) * KB + i], v = D.corr_v[(l * N + p) * KB + i] / 127.5 - 1;
          best.push([b, v]);
        }
        const hi = best[0][1], lo = best[KB - 1][1];  // viridis over the shown cosines, best brightest
        for (const [b, v] of best) cb[b] = colour(hi > lo ? (v - lo) / (hi - lo) : 1);
      }
      paint(canvasB, imgB, cwB, chB, BGH, BGW, cb, 0.7);
      if (p !== null) { outline(canvas, p, cw, ch, GH, GW, '#00e5ff'); outline(canvasB, best[0][0], cwB, chB, BGH, BGW, '#00e5ff'); }
      text = `query patch ${p === null ? '(click a patch of image A)' : p} | layer ${l}/${L - 1} | correspond` +
        (best.length ? `\nmost similar B patches: ` + best.map(([b, v]) => `${b} (${v.toFixed(3)})`).join(', ') : '');
    } else {
      const a = st.mode === 'pca' ? D.pca : D.pca_fg;
      for (let p = 0; p < N; p++) { const o = (l * N + p) * 3; colours[p] = [a[o], a[o + 1], a[o + 2]]; }
      paint(canvas, img, cw, ch, GH, GW, colours, 0.85);
      if (st.mode === 'pca-fg') { let n = 0; for (let p = 0; p < N; p++) if (a[(l * N + p) * 3] || a[(l * N + p) * 3 + 1] || a[(l * N + p) * 3 + 2]) n++; text += ` | ${n} of ${N} patches foreground`; }
    }
    for (const b of prefixDiv.children) { b.classList.toggle('sel', b.dataset.q === st.patch); b.style.background = ''; b.style.color = ''; b.textContent = b.dataset.q; }
    $('info').textContent = text;
  }
  async function fetchRow(st) {  // served: the query row, computed by the server (T float32)
    const q = new URLSearchParams({mode: st.mode, layer: st.layer, head: st.head, patch: st.patch,
                                   'class': st.cls === null ? '' : st.cls});
    const r = await fetch('row?' + q);
    if (!r.ok) throw new Error('row request failed: ' + await r.text());
    return Float64Array.from(new Float32Array(await r.arrayBuffer()));
  }
  let renderSeq = 0;
  async function render(st) {
    const seq = ++renderSeq;
    if (st.mode === 'pca' || st.mode === 'pca-fg' || st.mode === 'correspond') return renderDense(st);
    const row = SERVED && st.mode !== 'norms' ? await fetchRow(st) : queryRow(st, st.patch);
    if (seq !== renderSeq) return;  // a later view was asked for while this row was on its way
    const norm = normalise(row, st.mode);
    paint(canvas, img, cw, ch, GH, GW, Array.from({length: N}, (_, p) => colour(norm(row[R + p]))), 0.6);
    if (typeof st.patch === 'number' && st.mode !== 'norms') outline(canvas, st.patch, cw, ch, GH, GW, '#00e5ff');
    for (const b of prefixDiv.children) {  // prefix tokens: coloured by their value in the same scale
      const q = b.dataset.q, t = PREFIX.indexOf(q);
      b.classList.toggle('sel', q === st.patch);
      if (t >= 0) {
        const [r, g, bl] = colour(norm(row[t]));
        b.style.background = `rgb(${r},${g},${bl})`;
        b.style.color = (r + g + bl) / 3 > 128 ? '#000' : '#fff';
        b.textContent = `${q} ${row[t].toFixed(3)}`;
      }
    }
    const qname = typeof st.patch === 'number' ? `patch ${st.patch} (row ${Math.floor(st.patch / GW)}, col ${st.patch % GW})` : st.patch;
    let top = 0;
    for (let t = R; t < T; t++) if (row[t] > row[top] || top < R) top = t;
    const bound = keyBound(st);
    $('info').textContent = (st.mode === 'norms' ? `token norms | layer ${st.layer}/${L - 1}` :
      `query ${qname} | layer ${st.layer}/${L - 1} | head ${st.head} | ${st.mode}`) +
      (st.mode === 'attribution' ? ` | class ${CLASSES[classRank(st.cls)].name}` : '') +
      `\npatch values: min ${Math.min(...row.slice(R)).toFixed(4)}, max ${row[top].toFixed(4)} (patch ${top - R})` +
      (bound !== null ? `\ntokens not shipped (all but the top ${st.mode === 'similarity' ? meta.sim_topk : K}): ` +
       `each at most ${bound.toFixed(4)}` : '');
  }
  function syncControls() {
    $('mode').value = state.mode;
    $('layer').value = String(state.layer);
    $('layerval').textContent = `${state.layer} of 0..${L - 1}`;
    $('head').value = String(state.head);
    $('head').disabled = state.mode !== 'attention' && state.mode !== 'similarity';
    if (meta.compare) $('viewb').style.display = state.mode === 'correspond' ? '' : 'none';
    if (state.cls !== null) $('cls').value = String(state.cls);
    for (const tr of document.querySelectorAll('#preds tr')) tr.classList.toggle('sel', state.mode === 'attribution' && +tr.dataset.k === state.cls);
    $('note').textContent = NOTES[state.mode] + ` Precision: ${PRECISION[state.mode]}.` + (meta.reduced.length ? ' Reduced to fit the size budget: ' +
      meta.reduced.join('; ') + '.' : '') + (meta.readout === 'mean' ? ' Readout query "mean": the mean over the ' +
      'patch queries (this model mean-pools).' : meta.readout === 'map' ? ' Readout query "map": the attention-pooling ' +
      'head\'s latent query.' : '');
  }
  async function update() {
    syncControls();
    const f = fragment();
    history.replaceState(null, '', '#' + f);
    await render(state);
    body.setAttribute('data-state', f);
  }
  let hover = null;
  canvas.addEventListener('mousemove', ev => {  // hover previews the patch under the pointer
    const p = patchAt(ev);
    if (p === null || p === hover) return;
    hover = p;
    render(Object.assign({}, state, {patch: p}));
  });
  canvas.addEventListener('mouseleave', () => { hover = null; render(state); });
  canvas.addEventListener('click', ev => { const p = patchAt(ev); if (p !== null) { state.patch = p; hover = p; update(); } });
  window.addEventListener('hashchange', () => { applyFragment(location.hash); update(); });

  applyFragment(location.hash);
  await update();
  body.setAttribute('data-ready', '1');
})();
"""
