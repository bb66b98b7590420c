# A SIPp UAS standing in for the contact-center core in docker/compose.yml: Debian's sip-tester
# answers every INVITE 180 + 200 and every BYE 200 (`sipp -sn uas`).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends sip-tester \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10002 --create-home sipp
USER sipp
WORKDIR /home/sipp
EXPOSE 5080/udp
ENTRYPOINT ["sipp", "-sn", "uas", "-p", "5080", "-nostdin", "-trace_err"]
