-- Customers from seeds/customers.csv: the label value that identifies their series, currency, Stripe id.
/* config
materialized: view
*/
with source as (
    select * from seed_customers
),

final as (
    select
        customer_id::varchar as customer_id,
        name::varchar as customer_name,
        setup::varchar as setup,
        label_value::varchar as label_value,
        currency::varchar as currency,
        stripe_customer_id::varchar as stripe_customer_id
    from source
)

select * from final
