-- Every invoice line has an integer amount in minor units; usage and fee quantities are not negative.
/* audit
blocking: true
*/
with lines as (
    select * from fct_invoice_lines
),

final as (
    select
        month,
        customer_id,
        line_number,
        line_type,
        quantity,
        amount_minor
    from lines
    where amount_minor is null or (line_type <> 'risk_adjustment' and quantity < 0)
)

select * from final
