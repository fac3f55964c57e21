"""Reference services for the seed's story: copy them, they are meant to be read.

    order_service.py   a producer: an order row and its ChargeCustomer command, one transaction
    payment_worker.py  a consumer that is also a producer: charges a provider once per order
                       (effects ledger), records the payment and emits PaymentCaptured in the
                       transaction of its inbox row
    shipping.py        a consumer: one shipment per captured payment

This folder ships in the wheel as `outbox.examples` (like sql/ ships as `outbox.sql`), so that
`outbox demo`, which runs these very files, works after a plain `pip install`. See README.md.
"""
