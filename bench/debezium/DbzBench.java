// The Debezium side of bench/debezium_bench.py: the real embedded engine (PostgreSQL connector, pgoutput,
// Outbox Event Router) feeding a Kafka producer configured like our relay's (acks=all, idempotent).
// Compiled at bench time with javac against the pinned jars; driven by commands on stdin:
//   backlog <n> <label>   start an engine, time engine start -> Kafka ack of the n-th record, stop it
//   latency <n> <label>   start an engine, print FIRST at the first ack, then record created_at -> ack of
//                         the next n records whose event_type is Tick; print percentiles, stop it
//   quit
// Results are printed as one line: RESULT <json>.
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.ChangeEvent;
import io.debezium.embedded.Connect;
import java.io.BufferedReader;
import java.io.FileInputStream;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.connect.header.Header;
import org.apache.kafka.connect.source.SourceRecord;

public class DbzBench {
    static Properties engineProps = new Properties();
    static Properties producerProps = new Properties();
    static KafkaProducer<byte[], byte[]> producer;

    static byte[] bytes(Object o) {
        if (o == null) return null;
        if (o instanceof byte[] b) return b;
        return o.toString().getBytes(StandardCharsets.UTF_8);
    }

    public static void main(String[] args) throws Exception {
        Properties all = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) { all.load(in); }
        for (String k : all.stringPropertyNames()) {
            if (k.startsWith("producer.")) producerProps.put(k.substring(9), all.getProperty(k));
            else engineProps.put(k, all.getProperty(k));
        }
        producerProps.put("key.serializer", "org.apache.kafka.common.serialization.ByteArraySerializer");
        producerProps.put("value.serializer", "org.apache.kafka.common.serialization.ByteArraySerializer");
        producer = new KafkaProducer<>(producerProps);
        System.out.println("JVM_UP");
        System.out.flush();
        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = stdin.readLine()) != null) {
            String[] cmd = line.trim().split("\\s+");
            if (cmd[0].equals("quit")) break;
            long n = Long.parseLong(cmd[1]);
            String result = cmd[0].equals("latency") ? run(n, cmd[2], true) : run(n, cmd[2], false);
            System.out.println("RESULT " + result);
            System.out.flush();
        }
        producer.close();
        System.exit(0);
    }

    static String run(long n, String label, boolean latency) throws Exception {
        AtomicLong acked = new AtomicLong();
        AtomicLong ticks = new AtomicLong();
        CountDownLatch done = new CountDownLatch(1);
        long[] lastAck = new long[1];
        long[] firstRecord = new long[1];
        double[] lat = new double[(int) (latency ? n : 0)];
        String[] failure = new String[1];
        DebeziumEngine.ChangeConsumer<ChangeEvent<SourceRecord, SourceRecord>> consumer = (records, committer) -> {
            if (firstRecord[0] == 0) firstRecord[0] = System.nanoTime();
            List<Future<RecordMetadata>> futures = new ArrayList<>(records.size());
            for (ChangeEvent<SourceRecord, SourceRecord> event : records) {
                SourceRecord r = event.value();
                RecordHeaders headers = new RecordHeaders();
                String type = null, created = null;
                for (Header h : r.headers()) {
                    headers.add(h.key(), bytes(h.value()));
                    if (h.key().equals("event_type")) type = String.valueOf(h.value());
                    if (h.key().equals("created_at")) created = String.valueOf(h.value());
                }
                ProducerRecord<byte[], byte[]> pr = new ProducerRecord<>(r.topic(), null, bytes(r.key()), bytes(r.value()), headers);
                if (latency && "Tick".equals(type) && created != null) {
                    Instant c = Instant.parse(created);
                    futures.add(producer.send(pr, (md, ex) -> {
                        Instant now = Instant.now();
                        long i = ticks.getAndIncrement();
                        if (ex == null && i < lat.length)
                            lat[(int) i] = (now.getEpochSecond() - c.getEpochSecond()) * 1e3 + (now.getNano() - c.getNano()) / 1e6;
                    }));
                } else {
                    futures.add(producer.send(pr));
                }
            }
            // Like Debezium Server's Kafka sink: a batch is done when Kafka acknowledged all of it.
            for (Future<RecordMetadata> f : futures) {
                try { f.get(); } catch (Exception e) { throw new InterruptedException("produce failed: " + e); }
            }
            for (ChangeEvent<SourceRecord, SourceRecord> event : records) committer.markProcessed(event);
            committer.markBatchFinished();
            long total = acked.addAndGet(records.size());
            if (latency && acked.get() == records.size()) { System.out.println("FIRST"); System.out.flush(); }
            if ((!latency && total >= n) || (latency && ticks.get() >= n)) {
                lastAck[0] = System.nanoTime();
                done.countDown();
            }
        };
        Properties props = new Properties();
        props.putAll(engineProps);
        DebeziumEngine<ChangeEvent<SourceRecord, SourceRecord>> engine = DebeziumEngine.create(Connect.class)
                .using(props)
                .notifying(consumer)
                .using((success, message, error) -> {
                    if (!success) { failure[0] = message + (error == null ? "" : ": " + error); done.countDown(); }
                })
                .build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        long started = System.nanoTime();
        executor.execute(engine);
        boolean ok = done.await(600, TimeUnit.SECONDS);
        engine.close();
        executor.shutdown();
        executor.awaitTermination(60, TimeUnit.SECONDS);
        if (failure[0] != null || !ok)
            return "{\"label\":\"" + label + "\",\"error\":\"" + (ok ? failure[0] : "timeout").replace("\"", "'").replace("\n", " ") + "\"}";
        double seconds = (lastAck[0] - started) / 1e9;
        Runtime rt = Runtime.getRuntime();
        StringBuilder sb = new StringBuilder();
        sb.append("{\"label\":\"").append(label).append("\",\"events\":").append(acked.get())
          .append(",\"seconds\":").append(String.format("%.3f", seconds))
          .append(",\"engine_start_to_first_record_s\":").append(String.format("%.3f", (firstRecord[0] - started) / 1e9))
          .append(",\"engine\":\"").append(engine.getClass().getName()).append("\"")
          .append(",\"heap_used_mib\":").append((rt.totalMemory() - rt.freeMemory()) >> 20);
        if (latency) {
            double[] s = Arrays.copyOf(lat, (int) Math.min(ticks.get(), lat.length));
            Arrays.sort(s);
            sb.append(",\"latency_events\":").append(s.length);
            for (double p : new double[] {0.5, 0.9, 0.99}) {
                sb.append(",\"p").append((int) Math.round(p * 100)).append("_ms\":")
                  .append(String.format("%.2f", s[Math.min(s.length - 1, (int) (p * s.length))]));
            }
            sb.append(",\"max_ms\":").append(String.format("%.2f", s[s.length - 1]));
        }
        return sb.append("}").toString();
    }
}
