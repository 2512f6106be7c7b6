// The API client. Every data request carries the token in the Authorization
// header; the token lives in this tab's sessionStorage only (gone when the
// tab closes), never in a URL or a cookie.

const KEY = 'revive-token';

// The API answered 401: the token is wrong or was changed on the server.
export class Unauthorized extends Error {}

// Any other failure, with the API's message.
export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

export async function call(method, path, body, tok = token.get()) {
  const headers = { Accept: 'application/json', Authorization: `Bearer ${tok || ''}` };
  const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`cannot reach revive (${e.message})`, 0);
  }
  if (resp.status === 401) throw new Unauthorized('the API refused the token');
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) {
    const message = (data && data.error) || text.trim() || `HTTP ${resp.status}`;
    throw new ApiError(message, resp.status);
  }
  return data;
}

export const get = (path) => call('GET', path);
export const post = (path, body) => call('POST', path, body);

// A path segment from an id (ids are hex today; encode anyway).
export const seg = (s) => encodeURIComponent(s);
