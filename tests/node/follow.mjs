// A Node.js backend and its customer's page, as haul's API sees them: submit a task twice
// under one Idempotency-Key, then follow its events with a standard EventSource (the
// `eventsource` package) and a watch token, dropping the connection after two events and
// reconnecting with Last-Event-ID. Prints one JSON object: both answers and every event.
import {EventSource} from 'eventsource'

const base = process.env.HAUL_API
const token = process.env.HAUL_API_TOKEN
const files = JSON.parse(process.env.HAUL_FILES)
const TYPES = ['task.queued', 'task.retried', 'task.claimed', 'task.started', 'task.progress', 'file.completed',
  'task.finalizing', 'task.completed', 'task.failed', 'task.canceled', 'reset']

async function submit(key) {
  const answer = await fetch(`${base}/v1/tasks`, {
    method: 'POST',
    headers: {Authorization: `Bearer ${token}`, 'Content-Type': 'application/json', 'Idempotency-Key': key},
    body: JSON.stringify({name: 'Node order', files}),
  })
  return {status: answer.status, replayed: answer.headers.get('idempotent-replayed'), body: await answer.json()}
}

// Follow until `enough` says stop (then close), or until the server ends the stream for good
// (after the final event, its 204 leaves the EventSource CLOSED).
function follow(url, lastId, events, enough) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { source.close(); reject(new Error('no final event within 60 s')) }, 60000)
    const source = new EventSource(url, {
      fetch: (input, init) => fetch(input, {...init, headers: {...(lastId ? {'Last-Event-ID': lastId} : {}), ...init.headers}}),
    })
    const done = () => { clearTimeout(timer); source.close(); resolve() }
    for (const type of TYPES) {
      source.addEventListener(type, (event) => {
        events.push({id: event.lastEventId, type, data: JSON.parse(event.data)})
        if (enough(events)) done()
      })
    }
    source.onerror = () => { if (source.readyState === EventSource.CLOSED) done() }
  })
}

const first = await submit('node-order-1')
const again = await submit('node-order-1')
const url = `${base}/v1/tasks/${first.body.id}/events?watch_token=${encodeURIComponent(first.body.watch_token)}`
const events = []
await follow(url, null, events, (seen) => seen.length >= 2)
await follow(url, events[events.length - 1].id, events, () => false)
console.log(JSON.stringify({first, again, events}))
