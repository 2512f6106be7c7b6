// Building the page from data. Every string from the API becomes a text
// node or a property value: nothing here parses markup, so a VM named
// <script>alert(1)</script> shows as exactly that text.

// Props set as properties (their attribute forms differ or do not update).
const PROPS = new Set(['value', 'checked', 'disabled', 'selected', 'hidden', 'required']);

// h('tag', {attr: value, onclick: fn}, child, ...): an element. Children are
// nodes or strings (as text); null, undefined and false are skipped.
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (PROPS.has(key)) {
      el[key] = value;
    } else if (value === null || value === undefined || value === false) {
      continue;
    } else if (key === 'class') {
      el.className = value;
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  return append(el, children);
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// Sets an element's text only when it changed (no flicker, no lost selection).
export function setText(el, value) {
  const s = value === null || value === undefined ? '' : String(value);
  if (el.textContent !== s) el.textContent = s;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  if (i === 0) return `${Math.round(v)} B`;
  return `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${UNITS[i]}`;
}

export function rate(bps) {
  return `${bytes(bps)}/s`;
}

export function ratio(r) {
  return r === null || r === undefined ? '—' : `${(r * 100).toFixed(1)} %`;
}

export function when(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function clock(iso) {
  const d = iso ? new Date(iso) : new Date();
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString();
}

// A state name as people read it: "switching_over" -> "switching over".
export function words(name) {
  return String(name).replaceAll('_', ' ');
}

// A modal confirmation. fields: [{name, label, value, placeholder, required,
// options: [[value, text, disabled]]}]. Resolves to the fields' values, or
// null when cancelled (button, Escape).
export function confirmDialog({ title, message, fields = [], confirm = 'Confirm', danger = false }) {
  return new Promise((resolve) => {
    const inputs = fields.map((f) => {
      const id = `dialog-${f.name}`;
      const input = f.options
        ? h('select', { id, name: f.name },
          f.options.map(([value, text, disabled]) => h('option', { value, disabled: !!disabled }, text)))
        : h('input', {
          id, name: f.name, type: 'text', value: f.value || '', placeholder: f.placeholder,
          required: !!f.required, autocomplete: 'off', spellcheck: 'false',
        });
      if (f.options && f.value) input.value = f.value;
      return { f, input, row: h('div', { class: 'field' }, h('label', { for: id }, f.label), input) };
    });
    const cancel = h('button', { type: 'button', class: 'quiet', 'data-role': 'cancel' }, 'Cancel');
    const ok = h('button', { type: 'submit', class: danger ? 'danger' : 'primary', 'data-role': 'confirm' }, confirm);
    const form = h('form', { class: 'dialog-form', novalidate: true },
      h('h2', {}, title), h('p', {}, message), inputs.map((i) => i.row),
      h('div', { class: 'actions' }, cancel, ok));
    const dialog = h('dialog', { class: 'confirm' }, form);
    const done = (value) => {
      if (dialog.open) dialog.close();
      dialog.remove();
      resolve(value);
    };
    dialog.addEventListener('cancel', (e) => {
      e.preventDefault();
      done(null);
    });
    cancel.addEventListener('click', () => done(null));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      if (!form.reportValidity()) return;
      const values = {};
      for (const { f, input } of inputs) values[f.name] = input.value.trim();
      done(values);
    });
    document.body.append(dialog);
    dialog.showModal();
    (inputs.find((i) => !i.f.options)?.input || cancel).focus();
  });
}
