// Value by region over time, one uPlot series per region (data: history.json).
(function () {
  var box = document.getElementById("chart");
  if (!box || !window.uPlot) return;
  var palette = ["#0b5cad", "#b42318", "#1a7f37", "#9a6700", "#6e40c9", "#0e7490"];
  fetch(box.dataset.src, { credentials: "same-origin" })
    .then(function (r) { return r.json(); })
    .then(function (d) {
      box.dataset.regions = d.regions.join(",");
      if (!d.x.length) { box.textContent = "no history for this item yet"; return; }
      var series = [{}].concat(d.regions.map(function (r, i) {
        return { label: r, stroke: palette[i % palette.length], width: 2, spanGaps: false };
      }));
      var width = Math.max(280, box.clientWidth || 600);
      var plot = new uPlot({ width: width, height: 300, series: series,
                             axes: [{}, { label: d.field }] }, [d.x].concat(d.y), box);
      box.dataset.series = String(plot.series.length - 1);
      window.addEventListener("resize", function () {
        plot.setSize({ width: Math.max(280, box.clientWidth), height: 300 });
      });
    })
    .catch(function (e) { box.textContent = "chart failed: " + e; });
})();
