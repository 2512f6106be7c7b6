// Metrics at a glance: throughput of each frontend (NFS; NBD when the
// server runs it), block cache hit ratio, repository reads, copy
// migrations, sessions by state, and charts of the last minutes.

import { h, rate, ratio, bytes, setText, words } from './dom.js';
import { drawChart } from './chart.js';
import * as api from './api.js';

function tile(id, label) {
  const value = h('span', { class: 'tile-value', 'data-field': 'value' });
  const sub = h('span', { class: 'tile-sub', 'data-field': 'sub' });
  return { el: h('div', { class: 'tile', id }, h('span', { class: 'tile-label' }, label), value, sub), value, sub };
}

function legend(items) {
  return h('ul', { class: 'legend' }, items.map(([cls, label]) => h('li', {}, h('span', { class: `swatch ${cls}` }), label)));
}

export default {
  mount(root) {
    const tiles = h('div', { class: 'tiles' });
    const throughput = h('canvas', { class: 'chart', id: 'chart-throughput', role: 'img', 'aria-label': 'Throughput of the last minutes' });
    const hits = h('canvas', { class: 'chart', id: 'chart-hit-ratio', role: 'img', 'aria-label': 'Block cache hit ratio of the last minutes' });
    const throughputLegend = h('div');
    const sessionsLine = h('p', { class: 'muted', id: 'metrics-sessions' });
    root.append(h('h1', {}, 'Metrics'), tiles, sessionsLine,
      h('section', { class: 'card' }, h('h2', {}, 'Throughput'), throughput, throughputLegend),
      h('section', { class: 'card' }, h('h2', {}, 'Block cache hit ratio'), hits,
        legend([['c1', 'hits over lookups per interval (gaps: no lookups)']])),
      h('p', { class: 'hint' }, 'Prometheus scrapes the full set at /metrics with the same token.'));
    const made = new Map();
    const tileFor = (id, label) => {
      if (!made.has(id)) {
        const t = tile(id, label);
        made.set(id, t);
        tiles.append(t.el);
      }
      return made.get(id);
    };
    let last = null;
    const draw = () => {
      if (!last) return;
      const hist = last.history;
      const times = hist.map((s) => Date.parse(s.time));
      const span = last.history_secs;
      const lines = [];
      for (const f of last.frontends) {
        const name = f.name.toUpperCase();
        lines.push([`${name} read`, (x) => x.frontends[f.name]?.read_bps ?? null]);
        lines.push([`${name} write`, (x) => x.frontends[f.name]?.write_bps ?? null]);
      }
      lines.push(['repository reads', (x) => x.backup_read_bps]);
      lines.push(['copy migrations', (x) => x.migration_bps]);
      const colour = (i) => `c${(i % 6) + 1}`;
      const series = lines.map(([, pick], i) => ({ color: `--${colour(i)}`, values: hist.map(pick) }));
      const items = lines.map(([label], i) => [colour(i), label]);
      drawChart(throughput, { times, series, span, base: 1024, format: (v) => rate(v) });
      throughputLegend.replaceChildren(legend(items));
      drawChart(hits, {
        times, span, max: 1, format: (v) => `${Math.round(v * 100)} %`,
        series: [{ color: '--c1', values: hist.map((x) => x.hit_ratio) }],
      });
    };
    window.addEventListener('resize', draw);
    return {
      interval: 2000,
      unmount() {
        window.removeEventListener('resize', draw);
      },
      async refresh() {
        const m = await api.get('/api/v1/metrics/summary');
        last = m;
        const recent = m.history.length ? m.history[m.history.length - 1] : null;
        for (const f of m.frontends) {
          const r = recent && recent.frontends[f.name];
          const name = f.name.toUpperCase();
          const read = tileFor(`tile-${f.name}-read`, `${name} read`);
          setText(read.value, r ? rate(r.read_bps) : '—');
          setText(read.sub, `${bytes(f.read_bytes)} since start`);
          const write = tileFor(`tile-${f.name}-write`, `${name} write`);
          setText(write.value, r ? rate(r.write_bps) : '—');
          setText(write.sub, `${bytes(f.written_bytes)} since start · ${r ? Math.round(r.calls_per_sec) : 0} calls/s`);
        }
        const bc = tileFor('tile-hit-ratio', 'Block cache hit ratio');
        setText(bc.value, ratio(recent ? recent.hit_ratio : null));
        setText(bc.sub, `${ratio(m.block_cache.hit_ratio)} since start · ${bytes(m.block_cache.bytes)} cached`);
        const repo = tileFor('tile-backup-read', 'Repository reads');
        setText(repo.value, recent ? rate(recent.backup_read_bps) : '—');
        setText(repo.sub, `${bytes(m.block_cache.fetched_bytes)} since start`);
        const mig = tileFor('tile-migration', 'Copy migrations');
        setText(mig.value, recent ? rate(recent.migration_bps) : '—');
        setText(mig.sub, `${bytes(m.migration_bytes)} copied since start`);
        const states = Object.entries(m.sessions).map(([s, n]) => `${n} ${words(s)}`);
        setText(sessionsLine, `Sessions: ${states.length ? states.join(', ') : 'none'} · ${m.session_retries} automatic retries since start`);
        draw();
      },
    };
  },
};
