// The API benchmark's subscribers (ops/bench/api.py): BENCH_COUNT EventSources (the
// `eventsource` package of tests/node), each following one of BENCH_TASKS' streams, noting how
// long each live task.progress took from the millisecond Redis appended it (in its id,
// T<ms>-<seq>.<task>) to its receipt here. Prints "connected", then the latencies as JSON.
import {createRequire} from 'node:module'

const require = createRequire(new URL('../../tests/node/package.json', import.meta.url))
const {EventSource} = require('eventsource')
const {BENCH_PORT: port, BENCH_TOKEN: token, BENCH_TASKS: tasks, BENCH_COUNT: count, BENCH_SECONDS: seconds} = process.env
const ids = tasks.split(',')
const latencies = []
let open = 0
const sources = []
for (let i = 0; i < Number(count); i++) {
  const since = Date.now()
  const source = new EventSource(`http://127.0.0.1:${port}/v1/tasks/${ids[i % ids.length]}/events`, {
    fetch: (input, init) => fetch(input, {...init, headers: {...init.headers, Authorization: `Bearer ${token}`}}),
  })
  source.onopen = () => { open += 1 }
  source.addEventListener('task.progress', (event) => {
    const appended = Number(event.lastEventId.slice(1).split('-')[0])
    if (appended > since) latencies.push(Date.now() - appended)
  })
  sources.push(source)
}
while (open < Number(count)) await new Promise((resolve) => setTimeout(resolve, 50))
console.log('connected')
await new Promise((resolve) => setTimeout(resolve, Number(seconds) * 1000))
console.log(JSON.stringify(latencies))
for (const source of sources) source.close()
process.exit(0)
