// uPlot charts: every .uplot-chart loads its data-src JSON
// ({regions, x: [unix s], y: [[value per x] per region], field}) and draws one
// series per region. data-series / data-regions tell tests what was drawn.
(function () {
  if (!window.uPlot) return;
  var palette = ["#0b5cad", "#b42318", "#1a7f37", "#9a6700", "#6e40c9", "#0e7490"];
  document.querySelectorAll(".uplot-chart").forEach(function (box) {
    fetch(box.dataset.src, { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (d) {
        box.dataset.regions = d.regions.join(",");
        if (!d.x.length) { box.textContent = "nothing to chart yet"; return; }
        var series = [{}].concat(d.regions.map(function (r, i) {
          return { label: r, stroke: palette[i % palette.length], width: 2, spanGaps: true,
                   points: { show: true } };
        }));
        var width = Math.max(280, box.clientWidth || 600);
        var plot = new uPlot({ width: width, height: 280, series: series,
                               axes: [{}, { label: d.field }] }, [d.x].concat(d.y), box);
        box.dataset.series = String(plot.series.length - 1);
        window.addEventListener("resize", function () {
          plot.setSize({ width: Math.max(280, box.clientWidth), height: 280 });
        });
      })
      .catch(function (e) { box.textContent = "chart failed: " + e; });
  });
})();
