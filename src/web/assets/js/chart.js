// A small line chart drawn by hand on a canvas: time on x (the last
// minutes, "now" at the right), one or more series on y, gaps where a
// value is missing. Colours come from the stylesheet (--c1, --c2, ...).

const PAD = { left: 72, right: 10, top: 10, bottom: 24 };

function css(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

// A round axis maximum at or above v: 1, 2 or 5 times a power of ten (or of
// 1024 for byte rates, so the labels read 4 MiB/s rather than 4.19 MB/s).
export function niceMax(v, base = 10) {
  if (!(v > 0)) return 1;
  const unit = base ** Math.floor(Math.log(v) / Math.log(base));
  for (const m of [1, 2, 5, 10]) if (v <= m * unit) return m * unit;
  return 10 * unit;
}

// series: [{label, color: '--c1', values: [number|null]}] aligned with
// times (Date ms); span: seconds shown; max: y maximum (default: round
// above the data); format: y label text.
export function drawChart(canvas, { times, series, span, max, base = 10, format = String }) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, width, height);
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const top = max || niceMax(Math.max(0, ...series.flatMap((s) => s.values.filter((v) => v !== null))), base);
  const now = times.length ? times[times.length - 1] : Date.now();
  const x = (t) => PAD.left + plotW * (1 - (now - t) / (span * 1000));
  const y = (v) => PAD.top + plotH * (1 - v / top);
  const ink = css('--muted', '#666');
  g.font = '11px system-ui, sans-serif';
  g.lineWidth = 1;
  g.strokeStyle = css('--grid', '#ddd');
  g.fillStyle = ink;
  g.textAlign = 'right';
  g.textBaseline = 'middle';
  for (let i = 0; i <= 4; i += 1) {
    const v = (top * i) / 4;
    const py = Math.round(y(v)) + 0.5;
    g.beginPath();
    g.moveTo(PAD.left, py);
    g.lineTo(width - PAD.right, py);
    g.stroke();
    g.fillText(format(v), PAD.left - 6, py);
  }
  g.textAlign = 'center';
  g.textBaseline = 'top';
  const minutes = Math.round(span / 60);
  for (let m = minutes; m >= 0; m -= 1) {
    const px = x(now - m * 60000);
    g.fillText(m === 0 ? 'now' : `-${m} min`, Math.min(Math.max(px, PAD.left + 16), width - PAD.right - 14), height - PAD.bottom + 6);
  }
  g.save();
  g.beginPath();
  g.rect(PAD.left, PAD.top, plotW, plotH);
  g.clip();
  g.lineWidth = 2;
  g.lineJoin = 'round';
  for (const s of series) {
    g.strokeStyle = css(s.color, '#0f766e');
    g.beginPath();
    let drawing = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) {
        drawing = false;
        return;
      }
      const px = x(times[i]);
      const py = y(Math.min(v, top));
      if (drawing) g.lineTo(px, py);
      else g.moveTo(px, py);
      drawing = true;
    });
    g.stroke();
  }
  g.restore();
  canvas.dataset.samples = String(times.length);
}
