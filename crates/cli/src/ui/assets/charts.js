// Small line charts drawn as inline SVG: one series of per-second rates, newest at the right.

const NS = 'http://www.w3.org/2000/svg';
const WIDTH = 300;
const HEIGHT = 80;

/** A chart of the last `capacity` values in an `<svg>`, with the current value in `label`. */
export class Chart {
  constructor(svg, label, capacity = 120) {
    this.svg = svg;
    this.label = label;
    this.capacity = capacity;
    this.values = [];
    this.area = document.createElementNS(NS, 'polygon');
    this.area.setAttribute('class', 'area');
    this.line = document.createElementNS(NS, 'polyline');
    this.line.setAttribute('class', 'line');
    this.top = document.createElementNS(NS, 'text');
    this.top.setAttribute('class', 'scale');
    this.top.setAttribute('x', '3');
    this.top.setAttribute('y', '10');
    svg.replaceChildren(this.area, this.line, this.top);
  }

  /** Adds a value (a rate; negative values count as 0) and redraws. */
  push(value) {
    this.values.push(Math.max(0, Number.isFinite(value) ? value : 0));
    if (this.values.length > this.capacity) {
      this.values.splice(0, this.values.length - this.capacity);
    }
    this.draw();
  }

  draw() {
    const max = Math.max(1, ...this.values);
    const step = WIDTH / Math.max(1, this.capacity - 1);
    const offset = (this.capacity - this.values.length) * step;
    const points = this.values.map((v, i) => {
      const x = offset + i * step;
      const y = HEIGHT - (v / max) * (HEIGHT - 14);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    this.line.setAttribute('points', points.join(' '));
    if (points.length > 0) {
      this.area.setAttribute(
        'points',
        `${offset.toFixed(1)},${HEIGHT} ${points.join(' ')} ${WIDTH},${HEIGHT}`,
      );
    }
    this.top.textContent = `max ${format(max)}/s`;
    const now = this.values.length > 0 ? this.values[this.values.length - 1] : 0;
    this.label.textContent = `${format(now)}/s`;
  }
}

/** A rate for people: 0, 0.5, 12, 3.4k, 1.2M. */
export function format(v) {
  if (v >= 1e6) {
    return (v / 1e6).toFixed(1) + 'M';
  }
  if (v >= 1e4) {
    return (v / 1e3).toFixed(0) + 'k';
  }
  if (v >= 1e3) {
    return (v / 1e3).toFixed(1) + 'k';
  }
  if (v >= 10 || v === 0) {
    return v.toFixed(0);
  }
  return v.toFixed(1);
}
