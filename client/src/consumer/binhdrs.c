/*
 * The unparsed header block of a consumed record, straight from librdkafka's
 * message struct (see record_epoch.rs for why).
 *
 * Compiled by client/build.rs against the very sources (and configure
 * output) that rdkafka-sys built librdkafka from, so the struct layout used
 * here is the one of the linked library.
 */
#include "rdkafka_int.h"
#include "rdkafka_msg.h"

/*
 * Sets *data and *len to the record's header block as fetched (the Kafka v2
 * encoding: a varint count, then each key and value) and returns 1; the
 * bytes live as long as the message. Returns 0 where that block is not the
 * record's header list: a producer's message, or a consumed one whose
 * headers were already parsed or replaced (librdkafka then answers from
 * that list).
 */
int flotilla_consumed_header_bytes(const rd_kafka_message_t *rkmessage,
                                   const void **data,
                                   size_t *len) {
        const rd_kafka_msg_t *rkm = (const rd_kafka_msg_t *)rkmessage;

        if (rkm->rkm_flags & RD_KAFKA_MSG_F_PRODUCER || rkm->rkm_headers)
                return 0;
        *len  = (size_t)RD_KAFKAP_BYTES_LEN(&rkm->rkm_u.consumer.binhdrs);
        *data = rkm->rkm_u.consumer.binhdrs.data;
        return 1;
}
