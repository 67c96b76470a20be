// Command watermill-bench runs busbar's benchmark workloads through watermill (Go), so that
// busbar's criterion benches can put watermill beside busbar, the raw clients and the Rust
// peers in one run (benches/src/watermill_peer.rs starts it once per measured run).
//
//	watermill-bench BACKEND URL WORKLOAD N
//
// BACKEND is redis, nats, kafka or amqp; URL is the busbar URL of the broker (its host and
// credentials are used); WORKLOAD is publish, publish_batch<N> (N messages per Publish call),
// publish_concurrent<N> (N goroutines publishing one message per call) or e2e. It prints
// "elapsed_ns=<n>": the time of the measured part only (setup, the consumer's attach and an
// unmeasured probe message are not timed), the same workloads as busbar's: 100-byte
// payloads, 64 keys, a fresh topic per run, every message acked.
package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/IBM/sarama"
	"github.com/ThreeDotsLabs/watermill"
	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	wkafka "github.com/ThreeDotsLabs/watermill-kafka/v3/pkg/kafka"
	wjs "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/jetstream"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"
)

const (
	payloadBytes = 100
	keys         = 64
	probeLimit   = 120 * time.Second
	// How long the consumer may take for the measured messages after the last publish.
	drainLimit = 300 * time.Second
)

// side is one broker through watermill: a publisher and a subscriber of one group.
type side struct {
	pub message.Publisher
	sub message.Subscriber
}

// subscribe creates what the topic needs where the pub/sub offers that (the JetStream
// stream, the Kafka topic), then subscribes.
func (s *side) subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if init, ok := s.sub.(message.SubscribeInitializer); ok {
		if err := init.SubscribeInitialize(topic); err != nil {
			return nil, fmt.Errorf("initializing the topic: %w", err)
		}
	}
	messages, err := s.sub.Subscribe(ctx, topic)
	if err != nil {
		return nil, fmt.Errorf("subscribing: %w", err)
	}
	return messages, nil
}

func main() {
	if len(os.Args) != 5 {
		fail(errors.New("usage: watermill-bench BACKEND URL WORKLOAD N"))
	}
	backend, rawURL, workload := os.Args[1], os.Args[2], os.Args[3]
	n, err := strconv.Atoi(os.Args[4])
	if err != nil || n < 1 {
		fail(fmt.Errorf("N must be a positive number, got %q", os.Args[4]))
	}
	topic := "bench-wm-" + strings.ReplaceAll(uuid.NewString(), "-", "")[:12]
	s, err := open(backend, rawURL, topic)
	if err != nil {
		fail(err)
	}
	var elapsed time.Duration
	switch {
	case workload == "publish":
		elapsed, err = publish(s, topic, n, 1, 1)
	case strings.HasPrefix(workload, "publish_batch"):
		var batch int
		if batch, err = count(workload, "publish_batch"); err == nil {
			elapsed, err = publish(s, topic, n, batch, 1)
		}
	case strings.HasPrefix(workload, "publish_concurrent"):
		var tasks int
		if tasks, err = count(workload, "publish_concurrent"); err == nil {
			elapsed, err = publish(s, topic, n, 1, tasks)
		}
	case workload == "e2e":
		elapsed, err = endToEnd(s, topic, n)
	default:
		err = fmt.Errorf("unknown workload %q", workload)
	}
	if err != nil {
		fail(err)
	}
	fmt.Printf("elapsed_ns=%d\n", elapsed.Nanoseconds())
	// The process ends here without closing the pub/sub (see publish): nothing after the
	// measurement needs a clean close, every run has a fresh topic.
	os.Exit(0)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "watermill-bench:", err)
	os.Exit(1)
}

func msg(i int) *message.Message {
	p := []byte(fmt.Sprintf("%020d", i))
	for len(p) < payloadBytes {
		p = append(p, 'x')
	}
	m := message.NewMessage(watermill.NewUUID(), p)
	m.Metadata.Set("key", fmt.Sprintf("k%d", i%keys))
	return m
}

// count reads the number after prefix in a workload name (publish_batch100: 100).
func count(workload, prefix string) (int, error) {
	v, err := strconv.Atoi(strings.TrimPrefix(workload, prefix))
	if err != nil || v < 1 {
		return 0, fmt.Errorf("workload %q: expected %s<N>", workload, prefix)
	}
	return v, nil
}

// publish sends n messages, one Publish call per `batch` messages, from `tasks` goroutines
// (each waiting for its own calls), and times it.
func publish(s *side, topic string, n, batch, tasks int) (time.Duration, error) {
	// A group to receive, created before the clock starts (RabbitMQ keeps nothing for a
	// topic without a queue; the other brokers create the topic).
	// The subscription's context is never cancelled: watermill-nats 2.1.3's JetStream
	// subscriber panics ("send on closed channel") when it is cancelled with deliveries in
	// flight; the process ends after the measurement instead.
	if _, err := s.subscribe(context.Background(), topic); err != nil {
		return 0, err
	}
	started := time.Now()
	errs := make(chan error, tasks)
	for t := 0; t < tasks; t++ {
		go func(t int) {
			// Task t publishes the batches t, t + tasks, t + 2 tasks, ...
			for i := t * batch; i < n; i += batch * tasks {
				msgs := make([]*message.Message, 0, batch)
				for j := i; j < i+batch && j < n; j++ {
					msgs = append(msgs, msg(j))
				}
				if err := s.pub.Publish(topic, msgs...); err != nil {
					errs <- fmt.Errorf("publishing: %w", err)
					return
				}
			}
			errs <- nil
		}(t)
	}
	for t := 0; t < tasks; t++ {
		if err := <-errs; err != nil {
			return 0, err
		}
	}
	return time.Since(started), nil
}

// endToEnd publishes n messages in batches of 100 and consumes + acks all of them; timed
// from the first publish to the last message handled (after an unmeasured probe).
func endToEnd(s *side, topic string, n int) (time.Duration, error) {
	messages, err := s.subscribe(context.Background(), topic)
	if err != nil {
		return 0, err
	}
	var seen atomic.Int64
	done := make(chan struct{})
	go func() {
		for m := range messages {
			m.Ack()
			if seen.Add(1) == int64(n)+1 {
				close(done)
			}
		}
	}()
	probe := message.NewMessage(watermill.NewUUID(), []byte("probe"))
	if err := s.pub.Publish(topic, probe); err != nil {
		return 0, fmt.Errorf("publishing the probe: %w", err)
	}
	deadline := time.Now().Add(probeLimit)
	for seen.Load() < 1 {
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("the probe did not arrive within %v", probeLimit)
		}
		time.Sleep(5 * time.Millisecond)
	}
	started := time.Now()
	for i := 0; i < n; i += 100 {
		msgs := make([]*message.Message, 0, 100)
		for j := i; j < i+100 && j < n; j++ {
			msgs = append(msgs, msg(j))
		}
		if err := s.pub.Publish(topic, msgs...); err != nil {
			return 0, fmt.Errorf("publishing: %w", err)
		}
	}
	select {
	case <-done:
		return time.Since(started), nil
	case <-time.After(drainLimit):
		return 0, fmt.Errorf("%d of %d messages handled within %v of the last publish", seen.Load()-1, n, drainLimit)
	}
}

func open(backend, rawURL, topic string) (*side, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("URL: %w", err)
	}
	logger := watermill.NopLogger{}
	// A group of its own per run: the process ends without leaving it (see main), and a
	// dead member in a shared group would hold up the next member's join (a Kafka rebalance
	// waits for every member it knows; a busbar side once waited past its 120 s probe limit).
	group := "wm-" + topic
	switch backend {
	case "redis":
		client := redis.NewClient(&redis.Options{Addr: u.Host})
		pub, err := redisstream.NewPublisher(redisstream.PublisherConfig{Client: client}, logger)
		if err != nil {
			return nil, err
		}
		sub, err := redisstream.NewSubscriber(redisstream.SubscriberConfig{
			Client:        client,
			ConsumerGroup: group,
			// Only what is published after the group exists, as every side does.
			OldestId: "$",
		}, logger)
		if err != nil {
			return nil, err
		}
		return &side{pub, sub}, nil
	case "nats":
		natsURL := "nats://" + u.Host
		pub, err := wjs.NewPublisher(wjs.PublisherConfig{URL: natsURL, Logger: logger})
		if err != nil {
			return nil, err
		}
		sub, err := wjs.NewSubscriber(wjs.SubscriberConfig{
			URL:                 natsURL,
			Logger:              logger,
			ResourceInitializer: wjs.GroupedConsumer(group),
		})
		if err != nil {
			return nil, err
		}
		return &side{pub, sub}, nil
	case "kafka":
		brokers := []string{u.Host}
		marshaler := wkafka.NewWithPartitioningMarshaler(func(_ string, m *message.Message) (string, error) {
			return m.Metadata.Get("key"), nil
		})
		pub, err := wkafka.NewPublisher(wkafka.PublisherConfig{Brokers: brokers, Marshaler: marshaler}, logger)
		if err != nil {
			return nil, err
		}
		config := wkafka.DefaultSaramaSubscriberConfig()
		// The topic is new (created by SubscribeInitialize): from its start is what the other
		// sides' groups at "latest" see too, and a probe sent while the group joins counts.
		config.Consumer.Offsets.Initial = sarama.OffsetOldest
		sub, err := wkafka.NewSubscriber(wkafka.SubscriberConfig{
			Brokers:               brokers,
			Unmarshaler:           marshaler,
			ConsumerGroup:         group,
			OverwriteSaramaConfig: config,
			InitializeTopicDetails: &sarama.TopicDetail{
				NumPartitions:     4,
				ReplicationFactor: 1,
			},
		}, logger)
		if err != nil {
			return nil, err
		}
		return &side{pub, sub}, nil
	case "amqp":
		amqpURL := *u
		amqpURL.RawQuery = ""
		config := wamqp.NewDurablePubSubConfig(amqpURL.String(), wamqp.GenerateQueueNameTopicNameWithSuffix(group))
		// Publish returns once RabbitMQ confirmed, as busbar's and the raw client's do.
		config.Publish.ConfirmDelivery = true
		pub, err := wamqp.NewPublisher(config, logger)
		if err != nil {
			return nil, err
		}
		sub, err := wamqp.NewSubscriber(config, logger)
		if err != nil {
			return nil, err
		}
		return &side{pub, sub}, nil
	default:
		return nil, fmt.Errorf("backend %q: watermill is compared on redis, nats, kafka and amqp", backend)
	}
}
