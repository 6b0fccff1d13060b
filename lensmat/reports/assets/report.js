/* lensmat report.html: draws the run's data (the JSON in #lensmat-data) with plotly.js, inlined above.
   Sections: summary and provenance, values at one layer, per-layer curves, heatmaps, early-exit
   trade-offs, paired comparisons, and the trajectory view (click a cell: its top-k; pin a token:
   its rank through the layers). No network, no storage. */
async function lensmatLoadPlotly() {
  // plotly.js is inlined gzipped (base64): unpack it with the browser's own gzip and run it
  if (window.Plotly) return;
  const packed = document.getElementById("plotly-gz").textContent.trim();
  const bytes = Uint8Array.from(atob(packed), c => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const script = document.createElement("script");
  script.textContent = await new Response(stream).text();
  document.head.append(script);
}

lensmatLoadPlotly().then(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("lensmat-data").textContent);
  const main = document.getElementById("lensmat-report");
  const CONFIG = { displaylogo: false, responsive: true };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : v.toPrecision(4);
  }
  function section(title, note) {
    const s = el("section", {}, el("h2", { text: title }));
    if (note) s.append(el("p", { class: "note", text: note }));
    main.append(s);
    return s;
  }
  function keyValueTable(id, obj) {
    const t = el("table", { id });
    for (const [k, v] of Object.entries(obj)) {
      t.append(el("tr", {}, el("th", { text: k }), el("td", { text: typeof v === "object" ? JSON.stringify(v) : fmt(v) })));
    }
    return t;
  }

  // 1. what was run, on what, by which versions
  const about = section("Run", "What was measured and where it came from (report.json's fields).");
  about.append(keyValueTable("summary", D.summary));
  about.append(el("h3", { text: "Provenance" }), keyValueTable("provenance", D.provenance));
  if (D.bootstrap) {
    const b = D.bootstrap;
    about.append(el("p", { class: "note", text: `Intervals: ${Math.round(100 * (b.confidence || 0.95))}% ${b.method || "bootstrap"} ` +
      `over ${b.n_documents} ${b.unit || "documents"}, ${b.resamples} resamples, seed ${b.seed}.` }));
  }

  // 2. every value at one chosen layer
  const curves = D.curves || [];
  if (curves.length) {
    const s = section("Values at one layer", "Every per-layer value of the report at the chosen x (layer, block, k …), with its 95% interval where the report has one.");
    const xs = [...new Set(curves.flatMap(c => c.lines.flatMap(l => l.x)))].filter(x => x !== null).sort((a, b) => a - b);
    const select = el("select", { id: "layer-select" });
    for (const x of xs) select.append(el("option", { value: String(x), text: String(x) }));
    const table = el("table", { id: "layer-table" });
    function fill() {
      const x = Number(select.value);
      table.replaceChildren(el("tr", {}, ...["site", "metric", "lens", "value", "95% interval"].map(h => el("th", { text: h }))));
      for (const c of curves) for (const l of c.lines) {
        const i = l.x.indexOf(x);
        if (i < 0) continue;
        const interval = l.low[i] === null || l.high[i] === null ? "" : `[${fmt(l.low[i])}, ${fmt(l.high[i])}]`;
        table.append(el("tr", { "data-site": c.site, "data-metric": c.metric, "data-lens": l.name, "data-x": String(x) },
          el("td", { text: c.site }), el("td", { text: c.metric }), el("td", { text: l.name }),
          el("td", { class: "num value", text: fmt(l.y[i]) }), el("td", { class: "num", text: interval })));
      }
    }
    select.addEventListener("change", fill);
    s.append(el("div", { class: "controls" }, el("label", { text: "x = " }, select)), table);
    fill();

    // 3. the curves
    const c2 = section("Per-layer curves", "Hover a point for its value and interval; bars are 95% intervals over held-out documents. Click a legend entry to hide a line.");
    const grid = el("div", { class: "grid" });
    c2.append(grid);
    curves.forEach((c, n) => {
      const div = el("div", { class: "plot", id: `curve-${n}` });
      grid.append(div);
      const traces = c.lines.map(l => {
        const hasCI = l.low.some(v => v !== null);
        return {
          type: "scatter", mode: "lines+markers", name: l.name, x: l.x, y: l.y,
          customdata: l.x.map((_, i) => [l.low[i], l.high[i]]),
          hovertemplate: hasCI ? "%{fullData.name}: %{y:.4g}<br>95% [%{customdata[0]:.4g}, %{customdata[1]:.4g}]<extra></extra>"
                               : "%{fullData.name}: %{y:.4g}<extra></extra>",
          error_y: hasCI ? { type: "data", symmetric: false, visible: true, thickness: 1, width: 2,
                             array: l.y.map((y, i) => (y === null || l.high[i] === null ? null : l.high[i] - y)),
                             arrayminus: l.y.map((y, i) => (y === null || l.low[i] === null ? null : y - l.low[i])) } : undefined,
        };
      });
      Plotly.newPlot(div, traces, {
        title: { text: `${c.metric} (${c.site})`, font: { size: 13 } }, height: 300,
        margin: { l: 50, r: 10, t: 35, b: 40 }, xaxis: { title: { text: c.x_title } }, legend: { font: { size: 10 } },
      }, CONFIG);
    });
  }

  // 4. matrices
  if ((D.heatmaps || []).length) {
    const s = section("Heatmaps", "Hover a cell for its value; empty cells are undefined (e.g. l ≥ l').");
    const grid = el("div", { class: "grid" });
    s.append(grid);
    D.heatmaps.forEach((h, n) => {
      const div = el("div", { class: "plot", id: `heatmap-${n}` });
      grid.append(div);
      Plotly.newPlot(div, [{ type: "heatmap", z: h.z, colorscale: "Viridis", hoverongaps: false,
                             hovertemplate: "row %{y}, column %{x}: %{z:.4g}<extra></extra>" }],
        { title: { text: h.title, font: { size: 12 } }, height: 360, margin: { l: 50, r: 10, t: 40, b: 40 },
          xaxis: { title: { text: h.x_title } }, yaxis: { title: { text: h.y_title } } }, CONFIG);
    });
  }

  // 5. early exit: each rule's points, first numeric field against the second
  if ((D.trade_offs || []).length) {
    const s = section("Early-exit trade-offs", "Each rule's operating points (hover for every field of a point).");
    const grid = el("div", { class: "grid" });
    s.append(grid);
    D.trade_offs.forEach((t, n) => {
      const [xk, yk] = t.keys.includes("speedup") && t.keys.includes("agreement") ? ["speedup", "agreement"] : t.keys.slice(-2);
      const div = el("div", { class: "plot", id: `tradeoff-${n}` });
      grid.append(div);
      Plotly.newPlot(div, [{ type: "scatter", mode: "lines+markers", name: t.rule, x: t.points.map(p => p[xk]),
                             y: t.points.map(p => p[yk]),
                             text: t.points.map(p => Object.entries(p).map(([k, v]) => `${k}: ${fmt(v)}`).join("<br>")),
                             hovertemplate: "%{text}<extra></extra>" }],
        { title: { text: `${t.lens}: ${t.rule}`, font: { size: 13 } }, height: 300, margin: { l: 50, r: 10, t: 35, b: 40 },
          xaxis: { title: { text: xk } }, yaxis: { title: { text: yk } } }, CONFIG);
    });
  }

  // 6. paired comparisons
  const pairs = Object.entries(D.paired || {});
  if (pairs.length) {
    const s = section("Paired comparisons", "Differences between two lenses on the same documents: which is ahead (Holm-adjusted over layers), or within noise.");
    const t = el("table", { id: "paired" }, el("tr", {}, ...["pair", "metric", "ahead at layers", "within noise at layers"].map(h => el("th", { text: h }))));
    for (const [pair, metrics] of pairs) for (const [metric, r] of Object.entries(metrics || {})) {
      if (!r || !Array.isArray(r.ahead)) continue;
      const ahead = {}, noise = [];
      r.ahead.forEach((a, layer) => (a === null ? noise.push(layer) : (ahead[a] = ahead[a] || []).push(layer)));
      t.append(el("tr", {}, el("td", { text: pair }), el("td", { text: metric }),
        el("td", { text: Object.entries(ahead).map(([lens, ls]) => `${lens}: ${ls.join(", ")}`).join("; ") || "–" }),
        el("td", { text: noise.join(", ") || "–" })));
    }
    s.append(t);
  }

  // 7. the trajectory view
  const T = D.trajectories;
  if (T && T.lines && T.lines.length) {
    const s = section("Trajectories", `${T.lines.length} line(s) (${T.sampled_from || "the given text"}${T.max_tokens ? `, first ${T.max_tokens} tokens each` : ""}): ` +
      "each cell is a lens's top-1 at a layer (rows, L at the top) and position (columns), coloured by the chosen statistic. " +
      `Click a cell for its top-${T.k}; pin a token to follow its rank through the layers at that position.`);
    const lineSel = el("select", { id: "traj-line" }), lensSel = el("select", { id: "traj-lens" }), statSel = el("select", { id: "traj-stat" });
    T.lines.forEach((l, i) => lineSel.append(el("option", { value: String(i), text: `${i}: ${l.text.slice(0, 60)}` })));
    T.lenses.forEach((name, i) => lensSel.append(el("option", { value: String(i), text: name })));
    for (const [name, what] of Object.entries(T.statistics)) statSel.append(el("option", { value: name, text: `${name}: ${what}` }));
    statSel.value = "kl" in T.statistics ? "kl" : Object.keys(T.statistics)[0];
    const legend = el("span", { class: "legend", id: "traj-legend" });
    s.append(el("div", { class: "controls" }, el("label", { text: "line " }, lineSel), el("label", { text: "lens " }, lensSel),
      el("label", { text: "colour " }, statSel), legend));
    const grid = el("table", { class: "traj", id: "traj-grid" });
    s.append(el("div", { class: "traj-wrap" }, grid));
    const cellPanel = el("div", { id: "traj-cell" }, el("p", { class: "note", text: "Click a cell." }));
    const pinnedPlot = el("div", { class: "plot", id: "traj-pinned" });
    s.append(el("div", { class: "panels" }, cellPanel, el("div", {}, el("h3", { text: "Pinned tokens: rank through the layers" }), pinnedPlot)));
    const pinned = [];
    let current = null;  // {line, lens, layer, pos}

    const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];  // viridis
    function colour(t) {
      if (t === null || Number.isNaN(t)) return "#d9d9d9";
      t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
      const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
      const c = STOPS[i].map((v, j) => Math.round(v + f * (STOPS[i + 1][j] - v)));
      return `rgb(${c[0]},${c[1]},${c[2]})`;
    }
    const tok = id => (T.vocab[String(id)] !== undefined ? T.vocab[String(id)] : `#${id}`);

    function drawGrid() {
      const L = T.lines[Number(lineSel.value)], li = Number(lensSel.value), stat = statSel.value;
      const values = L.statistics[stat][li];
      const shown = v => (v === null ? null : stat === "target_rank" ? Math.log10(1 + v) : v);
      const flat = values.flat().map(shown).filter(v => v !== null);
      const sorted = [...flat].sort((a, b) => a - b);
      const lo = stat === "p_final_top1" ? 0 : sorted[0];  // the top 5% share the brightest colour: one outlier cell does not flatten the rest
      const hi = stat === "p_final_top1" ? 1 : sorted[Math.floor(0.95 * (sorted.length - 1))];
      const unshown = v => (stat === "target_rank" ? Math.pow(10, v) - 1 : v);
      legend.textContent = `${stat}: dark = ${fmt(unshown(lo))}, yellow ≥ ${fmt(unshown(hi))}; grey = no value; * = the lens does not cover the layer (the model's output).`;
      grid.replaceChildren(el("tr", {}, el("th", { text: "layer" }), ...L.tokens.map((t, p) => el("th", { title: `position ${p}`, text: t }))));
      for (let layer = values.length - 1; layer >= 0; layer--) {
        const row = el("tr", {}, el("th", { text: String(layer) }));
        L.tokens.forEach((_, p) => {
          const v = values[layer][p], top1 = L.top_ids[li][layer][p][0];
          const t = shown(v) === null || hi === lo ? (v === null ? null : 0.5) : (shown(v) - lo) / (hi - lo);
          const td = el("td", { "data-layer": String(layer), "data-pos": String(p), title: `layer ${layer}, position ${p}: ${stat} = ${fmt(v)}; top-1 ${JSON.stringify(tok(top1))}`,
                                text: tok(top1) + (L.covered[li][layer] ? "" : "*") });
          td.style.background = colour(t);
          td.style.color = t !== null && t > 0.6 ? "#000" : "#fff";
          td.addEventListener("click", () => showCell(layer, p));
          row.append(td);
        });
        grid.append(row);
      }
      if (current && current.line === Number(lineSel.value)) showCell(current.layer, current.pos);
      else { current = null; cellPanel.replaceChildren(el("p", { class: "note", text: "Click a cell." })); drawPinned(); }
    }

    function showCell(layer, pos) {
      const li = Number(lensSel.value), L = T.lines[Number(lineSel.value)];
      current = { line: Number(lineSel.value), lens: li, layer, pos };
      grid.querySelectorAll("td.selected").forEach(td => td.classList.remove("selected"));
      const td = grid.querySelector(`td[data-layer="${layer}"][data-pos="${pos}"]`);
      if (td) td.classList.add("selected");
      const target = L.targets[pos] >= 0 ? ` (next/target token ${JSON.stringify(tok(L.targets[pos]))})` : "";
      const table = el("table", { id: "traj-top", "data-layer": String(layer), "data-pos": String(pos), "data-lens": T.lenses[li] },
        el("tr", {}, ...["rank", "token", "p", ""].map(h => el("th", { text: h }))));
      L.top_ids[li][layer][pos].forEach((id, r) => {
        const button = el("button", { class: "pin", text: pinned.includes(id) ? "unpin" : "pin", "data-token": String(id) });
        button.addEventListener("click", () => {
          const i = pinned.indexOf(id);
          if (i >= 0) pinned.splice(i, 1); else pinned.push(id);
          showCell(layer, pos);
        });
        table.append(el("tr", { "data-token": String(id) }, el("td", { class: "num", text: String(r) }),
          el("td", { class: "token", text: JSON.stringify(tok(id)) }), el("td", { class: "num prob", text: fmt(L.top_probs[li][layer][pos][r]) }),
          el("td", {}, button)));
      });
      cellPanel.replaceChildren(el("h3", { text: `${T.lenses[li]}, layer ${layer}, position ${pos} ${JSON.stringify(L.tokens[pos])}` }),
        el("p", { class: "note", text: `The model's own top-1 here: ${JSON.stringify(tok(L.final_top1[pos]))}${target}.` }), table);
      drawPinned();
    }

    function drawPinned() {
      if (!current) { Plotly.react(pinnedPlot, [], { height: 300, annotations: [{ text: "Click a cell, then pin tokens", showarrow: false }] }, CONFIG); return; }
      const L = T.lines[current.line], li = Number(lensSel.value), cands = L.candidates[current.pos];
      const traces = [];
      for (const id of pinned) {
        const j = cands.indexOf(id);
        if (j < 0) continue;  // never in any lens's top-k at this position: its rank was not kept
        traces.push({ type: "scatter", mode: "lines+markers", name: JSON.stringify(tok(id)),
                      x: L.candidate_ranks[li].map((_, layer) => layer), y: L.candidate_ranks[li].map(r => r[current.pos][j] + 1),
                      customdata: L.candidate_ranks[li].map(r => r[current.pos][j]),
                      hovertemplate: "layer %{x}: rank %{customdata}<extra>%{fullData.name}</extra>" });
      }
      Plotly.react(pinnedPlot, traces, {
        height: 300, margin: { l: 55, r: 10, t: 30, b: 40 }, title: { text: `${T.lenses[li]}, position ${current.pos}`, font: { size: 12 } },
        xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "rank + 1 (1 = top-1)" }, type: "log", autorange: "reversed" },
      }, CONFIG);
    }

    for (const sel of [lineSel, lensSel, statSel]) sel.addEventListener("change", drawGrid);
    drawGrid();
  } else if (D.command === "compare") {
    section("Trajectories", "This run kept no trajectory view (views.json is missing): run the command again to add it.");
  }
  window.lensmatReport = { data: D };
  document.body.setAttribute("data-ready", "1");
}).catch(function (err) {
  document.body.prepend(Object.assign(document.createElement("p"), {
    textContent: `This page could not draw its figures (${err}); open it in a current browser (Chrome, Edge, Firefox, Safari 16.4 or newer).` }));
  throw err;
});
