// Kafka's own Java consumer (kafka-clients, the jar the test broker runs on) reading what the relay
// wrote, as a user's JVM service would: read_committed, no group, every partition from the start.
// Prints one tab-separated line per record: partition, the partition Java's default partitioner
// picks for its key, offset, base64 key, base64 value, and name=base64(value) per header; exits
// once it has `expect` records or after `timeoutMs`.
import java.time.Duration;
import java.util.ArrayList;
import java.util.Base64;
import java.util.List;
import java.util.Properties;

import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.utils.Utils;

public class JavaReader {
    public static void main(String[] args) {
        String bootstrap = args[0], topic = args[1];
        int expect = Integer.parseInt(args[2]);
        long timeoutMs = Long.parseLong(args[3]);
        Properties props = new Properties();
        props.put("bootstrap.servers", bootstrap);
        props.put("isolation.level", "read_committed");
        props.put("enable.auto.commit", "false");
        props.put("key.deserializer", ByteArrayDeserializer.class.getName());
        props.put("value.deserializer", ByteArrayDeserializer.class.getName());
        Base64.Encoder b64 = Base64.getEncoder();
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
            List<TopicPartition> parts = new ArrayList<>();
            for (PartitionInfo p : consumer.partitionsFor(topic, Duration.ofSeconds(30))) {
                parts.add(new TopicPartition(topic, p.partition()));
            }
            int count = parts.size();
            consumer.assign(parts);
            consumer.seekToBeginning(parts);
            int seen = 0;
            long deadline = System.currentTimeMillis() + timeoutMs;
            while (seen < expect && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
                    StringBuilder line = new StringBuilder();
                    // What KafkaProducer's BuiltInPartitioner does with a keyed record.
                    int javaPartition = r.key() == null ? -1 : Utils.toPositive(Utils.murmur2(r.key())) % count;
                    line.append(r.partition()).append('\t').append(javaPartition).append('\t')
                        .append(r.offset()).append('\t')
                        .append(r.key() == null ? "-" : b64.encodeToString(r.key())).append('\t')
                        .append(r.value() == null ? "-" : b64.encodeToString(r.value()));
                    for (Header h : r.headers()) {
                        line.append('\t').append(h.key()).append('=').append(b64.encodeToString(h.value()));
                    }
                    System.out.println(line);
                    seen++;
                }
            }
        }
    }
}
